"""The keyring table and the SQL that reads and writes it.

One row per data key. ``wrapped_key`` is the data key as the KMS wrapped it;
the plaintext key never reaches the database. ``active_scope`` equals
``scope`` on the scope's one active key and is NULL otherwise: a plain UNIQUE
constraint on it (NULLs never collide) keeps a scope to one active key on
every backend, so two processes racing to create a scope's first key cannot
both win. Every write runs in its own short transaction on the keyring's
engine, independent of the application's transaction, so a rollback there
never leaves ciphertext whose key row vanished.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import _runtime
from ._dberrors import lock_timed_out, lost_race
from .errors import ConfigurationError, RotationConflictError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

ACTIVE, RETIRED, DESTROYED = "active", "retired", "destroyed"

_own_io = threading.local()


def in_keyring_io() -> bool:
    """Whether this thread is inside one of the keyring's own connections."""
    return bool(getattr(_own_io, "depth", 0))


STATES = (ACTIVE, RETIRED, DESTROYED)

#: Seconds a statement on the keyring's own connections waits for a lock on the
#: keyring table before it fails (PostgreSQL, MySQL; SQLite's driver waits 5 s).
#: The keyring's own transactions are short; a longer wait is an application
#: transaction that changed the table, has not committed, and now waits in turn
#: for the key being loaded, which without a limit would wait forever.
LOCK_TIMEOUT = 30.0


def keyring_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(255), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_scope", sa.String(255), nullable=True, unique=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("kms_key_id", sa.String(2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"state IN {STATES!r}", name=f"ck_{name}_state"),
        sa.CheckConstraint(
            "(state = 'active' AND active_scope = scope) OR "
            "(state <> 'active' AND active_scope IS NULL)",
            name=f"ck_{name}_active_scope",
        ),
        sa.CheckConstraint(
            "(state = 'destroyed') = (wrapped_key IS NULL)", name=f"ck_{name}_shredded"
        ),
        comment="sqlalchemy-envelope data keys, wrapped by a KMS master key",
    )


@dataclass(frozen=True)
class KeyRow:
    """One keyring row; the wrapped key stays out of the repr."""

    id: int
    scope: str
    state: str
    kms_key_id: str
    created_at: dt.datetime
    wrapped_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Rewrapped:
    """A key's new wrapped form, to store where its row still holds ``expect``."""

    key_id: int
    wrapped: bytes = field(repr=False)
    kms_key_id: str
    expect: bytes = field(repr=False)


def sync_engine(engine: Any) -> Engine:
    """The ``Engine`` itself, or the one behind an ``AsyncEngine``; TypeError otherwise.

    (Checked by attribute, so that importing this library does not import
    SQLAlchemy's asyncio extension and, with it, the ORM.)
    """
    inner = getattr(engine, "sync_engine", engine)
    if not isinstance(inner, Engine):
        raise TypeError(
            f"engine must be a sqlalchemy Engine or AsyncEngine, not {type(engine).__name__}"
        )
    return inner


def in_memory(engine: Engine) -> bool:
    """Whether ``engine`` is an in-memory SQLite database (private to this process)."""
    if engine.dialect.name != "sqlite":
        return False
    database = engine.url.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or engine.url.query.get("mode") == "memory"
    )


def _own_pool(engine: Engine) -> Engine:
    """The application's engine with a connection pool of the keyring's own.

    Keys are loaded while the application holds connections: if every
    connection of a shared pool were held by readers waiting for one key, its
    loader could never get one. A separate pool (opened on demand, usually one
    connection, closed when the application's engine is disposed) cannot be
    exhausted by the application. An in-memory SQLite database lives in its one
    connection, and a ``StaticPool`` or ``SingletonThreadPool`` has one per
    process or thread: there, the keyring shares it (see :func:`_track`).
    """
    if isinstance(engine.pool, (sa.pool.StaticPool, sa.pool.SingletonThreadPool)) or in_memory(
        engine
    ):
        _track(engine)
        return engine
    own = Engine(
        engine.pool.recreate(),
        engine.dialect,
        engine.url,
        logging_name="sqlalchemy_envelope.keyring",
        hide_parameters=True,
    )
    if _lock_timeout_sql(own.dialect.name) is not None:

        @sa.event.listens_for(own, "connect")
        def limit_lock_waits(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(_lock_timeout_sql(own.dialect.name))
            finally:
                cursor.close()
            dbapi_connection.commit()  # a SET in a transaction rolled back is undone

    return own


def _tries() -> Iterator[int]:
    """The tries of a transaction that may lose a race, a short random pause before each
    retry (doubling up to ``_ROTATE_BACKOFF``), so racing writers fall out of step."""
    for attempt in range(_ROTATE_ATTEMPTS):
        if attempt:
            pause = min(_ROTATE_BACKOFF, 0.005 * 2**attempt)
            _runtime.sleep(random.uniform(0, pause))  # noqa: S311 - jitter, not a secret
        yield attempt


def _lock_timeout_sql(dialect: str) -> str | None:
    """The session setting that gives a connection :data:`LOCK_TIMEOUT`, where there is one."""
    if dialect == "postgresql":
        return f"SET lock_timeout = {max(1, round(LOCK_TIMEOUT * 1000))}"
    if dialect in ("mysql", "mariadb"):
        seconds = max(1, math.ceil(LOCK_TIMEOUT))  # metadata locks, then InnoDB's row locks
        return f"SET SESSION lock_wait_timeout = {seconds}, innodb_lock_wait_timeout = {seconds}"
    return None


#: Per engine whose one connection the keyring shares: the application's open
#: transactions, by the connection they hold (see :func:`_slot`), as
#: ``(thread, Connection)``.
_open: weakref.WeakKeyDictionary[Engine, dict[int, tuple[int, Connection]]] = (
    weakref.WeakKeyDictionary()
)


def _track(engine: Engine) -> None:
    """Follow the application's transactions on ``engine``, whose connection the keyring shares.

    A connection of the keyring's own there would be the application's: a
    read's connection would roll its transaction back when it returns to the
    pool, a new key's commit would commit it. So while a transaction is open,
    the keyring reads inside it, on the application's own ``Connection``, and
    creates no key (see :meth:`Keyring.connect`).
    """
    if engine in _open:
        return
    _open[engine] = {}

    def begin(conn: Connection) -> None:
        if not in_keyring_io():
            _open[conn.engine][_slot(conn.engine)] = (threading.get_ident(), conn)

    def end(conn: Connection) -> None:
        held, slot = _open[conn.engine], _slot(conn.engine)
        if slot in held and held[slot][1] is conn:
            del held[slot]

    sa.event.listen(engine, "begin", begin)
    sa.event.listen(engine, "commit", end)
    sa.event.listen(engine, "rollback", end)


def _slot(engine: Engine) -> int:
    """Which connection: one per thread (``SingletonThreadPool``), else one for all."""
    return threading.get_ident() if isinstance(engine.pool, sa.pool.SingletonThreadPool) else 0


def _in_transaction(engine: Engine) -> Connection | None:
    """The application's connection in a transaction on ``engine`` (shared), if any."""
    held = _open.get(engine)
    entry = None if not held else held.get(_slot(engine))
    if entry is None:
        return None
    thread, conn = entry
    if thread != threading.get_ident():
        raise ConfigurationError(
            "the keyring shares the engine's one database connection (a StaticPool), and "
            "another thread's transaction holds it: the keyring cannot use it without ending "
            "that transaction; give each thread its own connection (the default pool)"
        )
    return conn


@contextmanager
def beginning(conn: Connection) -> Iterator[None]:
    """While ``conn``'s transaction begins, before it did anything, the keyring may end it."""
    held, slot = _open.get(conn.engine), _slot(conn.engine)
    if held is None or slot not in held or held[slot][1] is not conn:
        yield
        return
    entry = held.pop(slot)
    try:
        yield
    finally:
        held[slot] = entry


#: How often a rotation that lost a race tries again before giving up, and the longest
#: pause (seconds) before a try: pauses double from 5 ms up to it, jittered so that
#: racing writers spread out instead of meeting again.
_ROTATE_ATTEMPTS = 30
_ROTATE_BACKOFF = 0.2


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Keyring:
    """Reads and writes keyring rows on the keyring's engine."""

    def __init__(self, table: sa.Table, engine: Engine | AsyncEngine) -> None:
        self.table = table
        #: The engine ``configure`` was given (under asyncio, an ``AsyncEngine``).
        self.app_engine = engine
        # Under asyncio the synchronous facade is driven from SQLAlchemy's
        # greenlet, so keyring I/O yields to the event loop like any statement.
        self.data_engine: Engine = sync_engine(engine)
        self.engine: Engine = _own_pool(self.data_engine)
        if self.engine is not self.data_engine:
            # The application disposing of its engine closes the keyring's pool too.
            sa.event.listen(self.data_engine, "engine_disposed", lambda _: self.dispose())

    def dispose(self) -> None:
        """Close the keyring's own connections (not the application's)."""
        if self.engine is self.data_engine:
            return
        if self.engine.dialect.is_async and not _runtime.in_greenlet():
            # Plain code (say ``configure`` again, from a coroutine) cannot await an
            # asyncio connection's close: drop them, as the pool would after failing
            # (and logging an error) to close them. ``await engine.dispose()``
            # closes them properly.
            self.engine.dispose(close=False)
            return
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Keyring(table={self.table.name!r}, engine={self.engine.url!r})"

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction of the keyring's own, for writes."""
        if _in_transaction(self.engine) is not None:
            raise ConfigurationError(
                "the keyring shares the application's one database connection (an in-memory "
                "SQLite database, a StaticPool or a SingletonThreadPool), where it cannot "
                "write a key while a transaction is open without ending that transaction: "
                "rotate between transactions, or use a database file with the default pool"
            )
        with self.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection of the keyring's own (marked, so engine events can tell)."""
        app = _in_transaction(self.engine)
        if app is None and self.engine.dialect.is_async and not _runtime.in_greenlet():
            raise ConfigurationError(
                "the keyring is on an asyncio engine, which can only be used from inside "
                "SQLAlchemy's greenlet: call key lifecycle methods (rotate, keys, destroy, "
                "rewrap) through `await connection.run_sync(lambda _: envelope.rotate(...))`"
            )
        _own_io.depth = getattr(_own_io, "depth", 0) + 1
        try:
            if app is not None:
                # The one connection is in the application's transaction: read in it,
                # and leave it open (no commit, no rollback, no return to the pool).
                yield from self._naming_a_missing_table(app, own=False)
            else:
                with self.engine.connect() as conn:
                    yield from self._naming_a_missing_table(conn, own=True)
        finally:
            _own_io.depth -= 1

    def _naming_a_missing_table(self, conn: Connection, *, own: bool) -> Iterator[Connection]:
        """Yield ``conn``; a statement that failed for want of the keyring table says so."""
        try:
            yield conn
        except sa.exc.DBAPIError as exc:
            if conn.invalidated:
                raise
            if own:
                conn.rollback()
                if lock_timed_out(exc):
                    raise self._locked() from exc
            if self._table_exists(conn):
                raise
        else:
            return
        raise self._missing()  # outside the handler: the driver's error is not chained

    def _table_exists(self, conn: Connection) -> bool:
        """After a failed keyring statement; True when that cannot be told (the error stands)."""
        try:
            return bool(sa.inspect(conn).has_table(self.table.name, self.table.schema))
        except sa.exc.DBAPIError:  # an aborted transaction (PostgreSQL), a lost connection
            return True

    def _missing(self) -> ConfigurationError:
        name = self.table.name if self.table.schema is None else self.table.fullname
        return ConfigurationError(
            f"the keyring table {name!r} does not exist on this database: create it "
            "(metadata.create_all with the Envelope's MetaData, envelope.table.create"
            "(engine), or op.create_keyring_table() in a migration), and commit its creation "
            "before writing encrypted values"
        )

    def _locked(self) -> ConfigurationError:
        return ConfigurationError(
            f"the keyring table {self.table.fullname!r} stayed locked by another transaction "
            f"for {LOCK_TIMEOUT:g} s. Most likely it is the application's own: one that "
            "created, dropped or altered the keyring table and, before committing, used an "
            "encrypted column, which waits for this key. Commit the keyring table's creation "
            "before writing encrypted values"
        )

    def _select(self) -> sa.Select[Any]:
        t = self.table
        return sa.select(
            t.c.id, t.c.scope, t.c.state, t.c.kms_key_id, t.c.created_at, t.c.wrapped_key
        )

    @staticmethod
    def _row(row: Any) -> KeyRow:
        wrapped = row.wrapped_key
        created = row.created_at
        if created.tzinfo is None:  # SQLite and MySQL drop the offset; we always write UTC
            created = created.replace(tzinfo=dt.timezone.utc)
        return KeyRow(
            id=row.id,
            scope=row.scope,
            state=row.state,
            kms_key_id=row.kms_key_id,
            created_at=created,
            wrapped_key=None if wrapped is None else bytes(wrapped),
        )

    def get(self, key_id: int, conn: Connection | None = None) -> KeyRow | None:
        # A BIGINT parameter: a key id read from a tampered value may not fit the
        # INTEGER column (Postgres would raise "out of range"); it just finds no row.
        stmt = self._select().where(self.table.c.id == sa.literal(key_id, sa.BigInteger))
        if conn is not None:
            row = conn.execute(stmt).first()
        else:
            with self.connect() as c:
                row = c.execute(stmt).first()
        return None if row is None else self._row(row)

    def active(self, scope: str) -> KeyRow | None:
        stmt = self._select().where(self.table.c.active_scope == scope)
        with self.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else self._row(row)

    def rows(self, scope: str | None = None, *, states: Sequence[str] = STATES) -> list[KeyRow]:
        stmt = self._select().where(self.table.c.state.in_(list(states))).order_by(self.table.c.id)
        if scope is not None:
            stmt = stmt.where(self.table.c.scope == scope)
        with self.connect() as conn:
            return [self._row(r) for r in conn.execute(stmt)]

    def insert_active(self, scope: str, wrapped: bytes, kms_key_id: str) -> KeyRow | None:
        """Insert the scope's active key; None when another writer's key won the race
        (a deadlock or a serialization failure is tried again, as for a rotation)."""
        lost: sa.exc.DBAPIError | None = None
        for _ in _tries():
            try:
                with self.begin() as conn:
                    return self._insert_active(conn, scope, wrapped, kms_key_id)
            except sa.exc.IntegrityError:
                return None
            except sa.exc.DBAPIError as exc:
                if not lost_race(exc):
                    raise
                lost = exc
        raise RotationConflictError(
            f"could not create the first data key of scope {scope!r}: concurrent writers "
            f"conflicted with it {_ROTATE_ATTEMPTS} times; nothing changed, try again"
        ) from lost

    def replace_active(
        self, scope: str, wrapped: bytes, kms_key_id: str
    ) -> tuple[KeyRow, int | None]:
        """Retire the scope's active key (if any) and insert a new one, atomically.

        Concurrent rotations of the scope conflict (a unique ``active_scope`` taken
        between our read and our insert, a deadlock on MySQL, a serialization failure):
        each try is a new transaction with the same wrapped key, so no KMS call is
        repeated. Raises :class:`RotationConflictError` when every try lost.
        """
        t = self.table
        lost: sa.exc.DBAPIError | None = None
        for _ in _tries():
            try:
                with self.begin() as conn:
                    old = conn.execute(
                        sa.select(t.c.id).where(t.c.active_scope == scope).with_for_update()
                    ).scalar()
                    if old is not None:
                        conn.execute(
                            t.update()
                            .where(t.c.id == old)
                            .values(state=RETIRED, active_scope=None, retired_at=_now())
                        )
                    return self._insert_active(conn, scope, wrapped, kms_key_id), old
            except sa.exc.DBAPIError as exc:
                # E.g. Postgres re-checks the row it waited for, finds it retired by the
                # rotation that held it, and returns none: our insert then collides.
                if not lost_race(exc):
                    raise
                lost = exc
        raise RotationConflictError(
            f"could not rotate scope {scope!r}: concurrent rotations of it conflicted with "
            f"this one {_ROTATE_ATTEMPTS} times; nothing changed, rotate again"
        ) from lost

    def _insert_active(
        self, conn: Connection, scope: str, wrapped: bytes, kms_key_id: str
    ) -> KeyRow:
        created = _now()
        result = conn.execute(
            self.table.insert().values(
                scope=scope,
                state=ACTIVE,
                active_scope=scope,
                wrapped_key=wrapped,
                kms_key_id=kms_key_id,
                created_at=created,
            )
        )
        key_id = result.inserted_primary_key[0]  # type: ignore[index]
        return KeyRow(key_id, scope, ACTIVE, kms_key_id, created, wrapped)

    def set_wrapped(self, changes: Sequence[Rewrapped]) -> list[bool]:
        """Compare-and-set the wrapped form of keys (for re-wrapping), all in one
        transaction: for each, False if it changed meanwhile."""
        t = self.table
        with self.begin() as conn:
            return [
                bool(
                    conn.execute(
                        t.update()
                        .where(t.c.id == c.key_id, t.c.wrapped_key == c.expect)
                        .values(wrapped_key=c.wrapped, kms_key_id=c.kms_key_id)
                    ).rowcount
                )
                for c in changes
            ]

    def destroy(self, key_id: int) -> None:
        t = self.table
        with self.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.id == key_id)
                .values(state=DESTROYED, active_scope=None, wrapped_key=None, destroyed_at=_now())
            )
