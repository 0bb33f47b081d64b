"""The engine of an in-place column conversion: shadow column, batched fill, swap.

The column is never altered while it holds data. A shadow column is added
beside it, filled in batches (one transaction each, in primary-key order) by
reading every value through one type and writing it through another, then
swapped in (:mod:`sqlalchemy_envelope.jobs.swap`). The shadow is named after the
direction, ``<column>__envelope`` when encrypting and
``<column>__envelope_plain`` when decrypting, so the state of an interrupted
run can be read from the schema alone:

========================  ==================================================
column, no shadow         not started, or finished (told apart by the values)
column and shadow         filling: rows whose shadow is NULL still need it
========================  ==================================================

While filling, a trigger (:mod:`~sqlalchemy_envelope.jobs.trigger`) sets a
row's shadow back to NULL when the application updates the column, so the
update is converted too; it comes and goes with the shadow.

A rerun picks up from there. The source is always the original column, so a
value is never encrypted twice, and the column is dropped only in the same
atomic step that puts the complete shadow in its place.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import CreateColumn

from .. import wire
from .._dberrors import deadlocked
from ..column import Encrypted
from ..errors import (
    ConfigurationError,
    DecryptionError,
    KeyDestroyedError,
    KeyNotFoundError,
    ValueTypeError,
)
from . import trigger
from .batches import (
    Key,
    Progress,
    Ticker,
    check_batch_size,
    connect,
    count,
    primary_key,
    sqlite_write_lock,
)
from .claims import LeaseLost, SharedJob, forget, job_name, jobs_table, jobs_table_name, worker_id
from .discovery import authentic, header_like
from .early import Classified, EarlyCiphertext
from .locks import briefly_locking
from .pages import lanes, walk
from .reports import ColumnJobReport
from .swap import swap
from .writes import BatchWrite

if TYPE_CHECKING:
    from ..envelope import Envelope

log = logging.getLogger("sqlalchemy_envelope")

ENCRYPTING, DECRYPTING = "__envelope", "__envelope_plain"
MAX_NAME = 63  # PostgreSQL's identifier limit (MySQL's is 64)
DEADLOCK_TRIES = 5  # runs in all when simultaneous workers deadlock each other


def _refuse_null_keys(conn: Connection, table: sa.Table, pk: list[sa.Column[Any]]) -> None:
    """SQLite accepts NULL in a key that is not INTEGER: such a row cannot be written by key."""
    if conn.dialect.name != "sqlite":  # elsewhere key columns are NOT NULL
        return
    null = sa.select(sa.literal(1)).select_from(table).where(sa.or_(*(c.is_(None) for c in pk)))
    if conn.execute(null.limit(1)).first() is not None:
        raise ConfigurationError(
            f"table {table.name!r} has rows with NULL in its primary key, which batch jobs "
            "cannot address; give them keys first (nothing was swapped)"
        )


def _lock_table(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """Lock ``table`` against writes and DDL until the transaction ends (PostgreSQL, SQLite).

    Run it under :func:`~.locks.briefly_locking`, which keeps the wait short.
    """
    if conn.dialect.name == "postgresql":
        qt = conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))
        conn.exec_driver_sql(f"LOCK TABLE {qt} IN SHARE ROW EXCLUSIVE MODE")
    elif conn.dialect.name == "sqlite":
        sqlite_write_lock(conn, table, schema, column)


@contextmanager
def _serialized(conn: Connection, name: str) -> Iterator[None]:
    """On MySQL, one worker at a time (DDL commits at once there, so no transaction can)."""
    if conn.dialect.name != "mysql":
        yield
        return
    key = "envelope:" + hashlib.sha256(name.encode()).hexdigest()[:40]
    with conn.begin():
        # Longer than a worker's tries at its table lock (jobs.locks) may last.
        got = conn.execute(sa.text("SELECT GET_LOCK(:k, 600)"), {"k": key}).scalar()
    if got != 1:
        raise ConfigurationError(
            f"{name}: another worker held the conversion's lock for 10 minutes"
        )
    try:
        yield
    finally:
        with conn.begin():
            conn.execute(sa.text("SELECT RELEASE_LOCK(:k)"), {"k": key})


def _stored_as_binary(type_: sa.types.TypeEngine[Any]) -> bool:
    """Whether a plaintext column of ``type_`` is binary too, as its encrypted one is."""
    while isinstance(type_, sa.types.TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, sa.types._Binary)


def shadow_name(column: str, suffix: str) -> str:
    name = column + suffix
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(column.encode()).hexdigest()[:8]
    return f"{column[: MAX_NAME - len(suffix) - 9]}_{digest}{suffix}"


def abandon(bind: Engine | Connection, table: str, column: str, schema: str | None) -> list[str]:
    """Drop the shadow columns and triggers of unfinished conversions of ``column``."""
    shadows = [shadow_name(column, s) for s in (ENCRYPTING, DECRYPTING)]
    with connect(bind) as conn:
        with conn.begin():
            present = {c["name"] for c in sa.inspect(conn).get_columns(table, schema)}
        for shadow in shadows:  # a trigger may have outlived its shadow (dropped by hand)
            step = functools.partial(trigger.remove, conn, table, schema, shadow)
            briefly_locking(conn, f"{table}: dropping the trigger of {shadow}", step)
        dropped = [shadow for shadow in shadows if shadow in present]
        for shadow in dropped:
            drop_shadow(conn, table, schema, shadow)
    return dropped


def drop_shadow(conn: Connection, table: str, schema: str | None, shadow: str) -> None:
    """Drop a shadow column and its trigger, in one transaction where DDL allows."""
    step = functools.partial(_drop_shadow, conn, table, schema, shadow)
    briefly_locking(conn, f"{table}: dropping {shadow}", step)


def _drop_shadow(conn: Connection, table: str, schema: str | None, shadow: str) -> None:
    q = conn.dialect.identifier_preparer
    trigger.remove(conn, table, schema, shadow)
    qt = q.format_table(sa.table(table, schema=schema))
    conn.exec_driver_sql(f"ALTER TABLE {qt} DROP COLUMN {q.quote(shadow)}")


class Conversion:
    """One column's conversion, plaintext to encrypted or back; its state lives in the schema."""

    def __init__(
        self,
        table: str,
        column: str,
        schema: str | None,
        suffix: str,
        *,
        read: sa.types.TypeEngine[Any],
        write: sa.types.TypeEngine[Any],
        shadow_type: sa.types.TypeEngine[Any],
        keep_ciphertext: bool = False,
    ) -> None:
        self.table, self.column, self.schema = table, column, schema
        self.keep_ciphertext = keep_ciphertext
        self.encrypting = suffix == ENCRYPTING
        self.shadow = shadow_name(column, suffix)
        self.other = shadow_name(column, DECRYPTING if self.encrypting else ENCRYPTING)
        self.read, self.write, self.shadow_type = read, write, shadow_type
        self.verb = "encrypt_column" if self.encrypting else "decrypt_column"
        self.job = job_name(f"{self.verb} {table}.{column}")  # its plan, when distributed

    def run(
        self,
        envelope: Envelope,
        bind: Engine | Connection,
        batch_size: int,
        progress: Progress | None,
        distributed: bool,
        chunk_rows: int | None,
        lease: float,
        warm: Callable[[], None] | None,
    ) -> ColumnJobReport:
        batch_size = check_batch_size(batch_size)
        report = ColumnJobReport(self.table, self.column)
        owner = worker_id()  # kept by a retry, which takes its own claims back at once
        tries = 1
        while True:
            try:
                return self._run(
                    envelope, bind, batch_size, progress, distributed, chunk_rows, lease, warm,
                    report, owner,
                )  # fmt: skip
            except sa.exc.DBAPIError as exc:
                if tries == DEADLOCK_TRIES or not deadlocked(exc):
                    raise
            tries += 1
            # Every step is resumable: run again from where the deadlock's victim stopped.
            log.warning(
                "%s %s.%s: deadlocked with another transaction; resuming (try %d of %d)",
                self.verb, self.table, self.column, tries, DEADLOCK_TRIES,
            )  # fmt: skip
            time.sleep(random.uniform(0.1, 0.5) * tries)  # noqa: S311 - jitter, not a secret

    def _run(
        self,
        envelope: Envelope,
        bind: Engine | Connection,
        batch_size: int,
        progress: Progress | None,
        distributed: bool,
        chunk_rows: int | None,
        lease: float,
        warm: Callable[[], None] | None,
        report: ColumnJobReport,
        owner: str,
    ) -> ColumnJobReport:
        where = f"{self.table}.{self.column}"
        jobs = jobs_table(jobs_table_name(envelope), self.schema)
        with connect(bind) as conn, lanes(bind) as more:
            self._check_keys(conn)  # before any DDL
            state = self._prepare(conn, jobs)
            table = self._reflect(conn)
            if state != "done" and self.shadow not in table.c:  # swapped by another worker?
                state = self._state(conn)
                if state != "done":
                    raise ConfigurationError(
                        f"{where}: {self.shadow} was dropped while the job started; run it again"
                    )
            if state == "done":
                report.already_done = True
                log.info("%s %s: already done", self.verb, where)
                return report
            if state != "added":  # resumed: the shadow column may be an earlier run's
                self._check_shadow_type(table.c[self.shadow].type)
            pk = primary_key(table)
            src, dst = table.c[self.column], table.c[self.shadow]
            todo = (dst.is_(None), src.is_not(None))
            read = self.read
            write: Callable[[Connection, list[Key], list[Any]], int]
            write = BatchWrite(conn.dialect, table, pk, dst, self.write, where=[dst.is_(None)])
            if isinstance(self.write, Encrypted):  # see jobs.early
                read = Classified(read, self.write.crypter())
                copy = BatchWrite(
                    conn.dialect, table, pk, dst, sa.LargeBinary(), where=[dst.is_(None)]
                )
                write = EarlyCiphertext(
                    write, copy, self.write.crypter(), where, keep=self.keep_ciphertext
                )
            query = sa.select(*pk, sa.type_coerce(src, read)).where(*todo)

            def convert(c: Connection, rows: list[sa.Row[Any]]) -> None:
                n = len(pk)
                write(c, [tuple(r[:n]) for r in rows], [r[n] for r in rows])

            def convert_all(c: Connection, rows: list[sa.Row[Any]]) -> None:
                # Under the swap's lock nothing else writes: every row read must be
                # written, or the column would be dropped with values not copied.
                n = len(pk)
                if write(c, [tuple(r[:n]) for r in rows], [r[n] for r in rows]) != len(rows):
                    raise RuntimeError(
                        f"{where}: a row to convert was not written before the swap (a bug: "
                        "please report it); nothing was swapped, the job can be run again"
                    )

            def work(lo: Key | None, hi: Key | None, renew: Callable[[], None]) -> None:
                for rows in walk(
                    conn, query, pk, convert, batch_size=batch_size, lo=lo, hi=hi,
                    before_batch=warm, lock=True, lanes=more,
                ):  # fmt: skip
                    report.rows += rows
                    renew()
                    # Rows inserted meanwhile are converted too: the total grows with them.
                    ticker.total = max(ticker.total or 0, report.rows)
                    if progress is not None:
                        progress(report.rows, ticker.total)
                    ticker.tick(report.rows)

            def rest() -> int:
                if warm is not None:
                    warm()
                # Under the swap's table lock: no row locks, and one scan for the few rows left.
                _refuse_null_keys(conn, table, pk)  # rows inserted meanwhile, too
                pages = walk(
                    conn, query, pk, convert_all, batch_size=batch_size,
                    transactions=False, bounded=False,
                )  # fmt: skip
                return sum(pages)

            def final(renew: Callable[[], None]) -> None:
                if self._state(conn) == "filling":
                    swap(
                        conn,
                        self.table,
                        self.schema,
                        self.column,
                        self.shadow,
                        self.shadow_type,
                        rest,
                        renew,
                    )
                    report.swapped = True

            failure: Exception | None = None
            try:  # from here on, another run may swap the column away at any point
                total = count(conn, table, *todo)
                log.info("%s %s: %d rows to convert, into %s", self.verb, where, total, self.shadow)
                ticker = Ticker(self.verb, where, total)
                if distributed:
                    shared = SharedJob(
                        conn,
                        jobs,
                        self.job,
                        chunk_rows=chunk_rows or 10 * batch_size,
                        lease=lease,
                        owner=owner,
                    )
                    shared.run(table, pk, work, final)
                else:
                    work(None, None, lambda: None)
                    final(lambda: None)
            except (sa.exc.StatementError, ValueTypeError, ConfigurationError) as exc:
                failure = exc
            # Decided outside the handler: nothing raised now chains the failure along.
            if failure is not None:
                # A statement naming a column another run swapped away, or a refusal that
                # found the job finished (a shadow whose trigger that swap dropped, say).
                elsewhere = (sa.exc.DBAPIError, ConfigurationError)
                finished = (
                    isinstance(failure, elsewhere)
                    and not isinstance(failure, LeaseLost)
                    and self._finished_elsewhere(conn)
                )
                if finished:
                    log.info("%s %s: another run finished the conversion", self.verb, where)
                    report.already_done = True
                else:
                    raise self._explained(failure) or failure
        log.info("%s %s: finished (%d rows converted here)", self.verb, where, report.rows)
        return report

    def _finished_elsewhere(self, conn: Connection) -> bool:
        """After a failure: whether a run started at the same time swapped the column."""
        if conn.in_transaction():
            conn.rollback()
        try:
            return self._state(conn) == "done"
        except (sa.exc.DBAPIError, ConfigurationError):
            return False

    @property
    def _start_over(self) -> str:
        return (
            "to run it with another type, first drop the unfinished conversion with "
            "sqlalchemy_envelope.jobs.abandon_conversion(engine, "
            f"{self.table!r}, {self.column!r})"
        )

    def _explained(self, exc: Exception) -> Exception | None:
        """The error for a value the conversion cannot write, saying how to start over
        (None for other failures). Names classes and types only, never a value."""
        if isinstance(exc, sa.exc.DataError):  # not its text: it may quote the value
            return ConfigurationError(
                f"{self.table}.{self.column}: the database refused a converted value "
                f"({type(exc.orig).__name__}); {self._start_over}"
            )
        bad = exc.orig if isinstance(exc, sa.exc.StatementError) else exc
        if isinstance(bad, ValueTypeError):  # a value of another type than declared
            return ValueTypeError(f"{bad}; {self._start_over}")
        return None

    def _check_shadow_type(self, found: sa.types.TypeEngine[Any]) -> None:
        """A resumed run must fill the shadow column with the type it asks for: one
        left by a run with a too narrow string type would refuse every long value again."""
        wanted = self.shadow_type
        lengths = getattr(found, "length", None), getattr(wanted, "length", None)
        if (
            all(isinstance(t, sa.String) and not isinstance(t, sa.Enum) for t in (found, wanted))
            and all(isinstance(n, int) for n in lengths)
            and lengths[0] != lengths[1]
        ):
            raise ConfigurationError(
                f"{self.table}.{self.column}: the unfinished conversion's {self.shadow} is "
                f"{found!r}, this run asks for {wanted!r}; {self._start_over}"
            )

    # -- the state, read from the schema ----------------------------------------------
    def _columns(self, conn: Connection, *, begin: bool = True) -> dict[str, Any]:
        with conn.begin() if begin else nullcontext():
            return {
                c["name"]: c["type"] for c in sa.inspect(conn).get_columns(self.table, self.schema)
            }

    def _check_keys(self, conn: Connection) -> None:
        """The job pages by the primary key: refuse a table without one, with NULLs in it,
        or a column of it (the key itself cannot be swapped for another column)."""
        table = self._reflect(conn)
        pk = primary_key(table)
        if any(c.name == self.column for c in pk):
            raise ConfigurationError(
                f"{self.table}.{self.column} is part of the table's primary key, which "
                f"{self.verb} cannot convert (batch jobs find rows by it); encrypt another "
                "column, and key the table by a surrogate key"
            )
        with conn.begin():
            _refuse_null_keys(conn, table, pk)

    def _state(self, conn: Connection) -> str:
        columns = self._columns(conn)
        if self.shadow in columns:
            if self.column not in columns:
                raise ConfigurationError(
                    f"{self.table}.{self.column} is missing but its shadow {self.shadow} exists; "
                    "rename the shadow back to the column's name and rerun"
                )
            return "filling"
        if self.column not in columns:
            raise ConfigurationError(f"table {self.table!r} has no column {self.column!r}")
        encrypted = self._holds_ciphertext(conn, columns[self.column])
        return "done" if encrypted == self.encrypting else "start"

    def _prepare(self, conn: Connection, jobs: sa.Table) -> str:
        """Add the shadow column if needed: "added", "filling" or (nothing to do) "done"."""
        with _serialized(conn, f"{self.table}.{self.column}"):
            return self._prepare_now(conn, jobs)

    def _prepare_now(self, conn: Connection, jobs: sa.Table) -> str:
        state = self._state(conn)
        if self.other in self._columns(conn):
            # Left by an interrupted conversion the other way, never swapped in.
            log.info(
                "%s.%s: dropping %s, left by an interrupted run",
                self.table,
                self.column,
                self.other,
            )
            drop_shadow(conn, self.table, self.schema, self.other)
        if state == "filling":
            if self._has_trigger(conn):
                return "filling"  # the usual resume: no lock taken
            state = self._untrusted(conn)
        if state != "start":
            return state
        # Before the shadow exists, so no crash leaves it beside the plan of an earlier one
        # (abandoned, or dropped above), whose ranges marked done it lacks: a distributed
        # run would skip them and convert their rows under the swap's table lock.
        forget(conn, jobs, self.job)
        spec = CreateColumn(sa.Column(self.shadow, self.shadow_type, nullable=True))
        added = False

        def add() -> None:  # takes the table lock; one transaction with the trigger (not MySQL)
            nonlocal added
            added = False
            if isinstance(self.shadow_type, sa.types.SchemaType):
                # A PostgreSQL ENUM type the plain column needs (Encrypted's never made one).
                self.shadow_type.create(conn, checkfirst=True)
            self._ddl(conn, f"ADD COLUMN {spec.compile(dialect=conn.dialect)}")
            added = True

        def install() -> None:
            trigger.install(conn, self.table, self.schema, self.column, self.shadow)

        try:
            briefly_locking(
                conn, f"{self.table}.{self.column}: adding {self.shadow}", install, lock=add
            )
        except (ConfigurationError, sa.exc.DBAPIError):
            if added:  # no trigger: MySQL committed the ADD COLUMN, take it back
                if self.shadow in self._columns(conn):
                    drop_shadow(conn, self.table, self.schema, self.shadow)
                raise
            if self._state(conn) != "filling":  # not another worker's concurrent add
                raise
            return self._prepare_now(conn, jobs)  # theirs: resume it (ADD is not tried again)
        return "added"

    def _has_trigger(self, conn: Connection) -> bool:
        with conn.begin():
            return trigger.exists(conn, self.table, self.schema, self.shadow)

    def _untrusted(self, conn: Connection) -> str:
        """The shadow has no trigger: drop it ("start"), unless it is gone meanwhile."""

        def check() -> str | None:  # safe to repeat, as MySQL may (no lock there)
            _lock_table(conn, self.table, self.schema, self.column)  # against a swap meanwhile
            if self.shadow not in self._columns(conn, begin=False):
                return None
            if trigger.exists(conn, self.table, self.schema, self.shadow):
                return "filling"
            log.warning(
                "%s.%s: %s has no trigger (left by an earlier release, or by a swap "
                "stopped on MySQL), so updates since may be missing from it: filling it again",
                self.table,
                self.column,
                self.shadow,
            )
            _drop_shadow(conn, self.table, self.schema, self.shadow)
            return "start"

        state = briefly_locking(conn, f"{self.table}.{self.column}: checking {self.shadow}", check)
        # None: swapped, abandoned or restarted by another worker meanwhile.
        return self._state(conn) if state is None else state

    def _holds_ciphertext(self, conn: Connection, reflected: Any) -> bool:
        """Whether the column holds this column's ciphertext (an empty binary column does).

        Decided by values that authenticate, not by a sample that looks right:
        a value written around the library (plaintext after a swap, by old
        code) must not make a finished conversion run again over ciphertext,
        nor uploaded bytes that begin like a header make it skip plaintext (a
        column being encrypted that holds its ciphertext beside other values is
        neither: refused, or with ``keep_ciphertext`` started). A
        column that holds nothing but values under keys the keyring lacks is
        refused: most likely the envelope names the wrong keyring table.
        """
        if not isinstance(reflected, sa.types._Binary):
            return False
        encrypted = self.write if self.encrypting else self.read
        assert isinstance(encrypted, Encrypted)
        # Text, numbers, dates: the column is binary only once converted, and other values
        # in it were written around the library since (verify counts them): not looked for.
        beside = not self.encrypting or _stored_as_binary(encrypted.inner_type)
        col = sa.column(self.column, sa.LargeBinary)
        table = sa.table(self.table, col, schema=self.schema)
        looks_ours = header_like(col)
        with conn.begin():
            candidates = conn.execute(sa.select(col).select_from(table).where(looks_ours).limit(16))
            values = [v for v in candidates.scalars() if wire.parse_header(v) is not None]
            present = sa.select(col).select_from(table).where(col.is_not(None))
            if not values:
                return conn.execute(present.limit(1)).first() is None
            mixed = beside and conn.execute(present.where(~looks_ours).limit(1)).first() is not None
        crypter = encrypted.crypter()
        unknown: set[int] = set()
        scopes: set[str] = set()  # of keys the values name, other than this column's
        proven: set[str] = set()  # of those, where a value is this column's ciphertext
        for value in map(bytes, values):  # outside the transaction: keys may be loaded
            try:
                crypter.decrypt(value)
            except KeyDestroyedError:
                # Shredded, yet the keyring knows it: ours, where nothing says otherwise.
                # Beside other values it cannot be authenticated, so only a key of this
                # column's scope counts (an upload may name any shredded key), and as
                # ciphertext beside plaintext, not as a finished job.
                if not (self.encrypting and mixed):
                    return True
                row = crypter.envelope.keyring().get(wire.key_id_of(value) or 0)
                if row is None or row.scope != crypter.scope:
                    continue
            except KeyNotFoundError:
                unknown.add(wire.key_id_of(value) or 0)
                continue
            except DecryptionError:  # bytes that only look like ours, or another scope's
                row = crypter.envelope.keyring().get(wire.key_id_of(value) or 0)
                if row is not None and row.scope != crypter.scope:
                    scopes.add(row.scope)
                    if (
                        mixed
                        and not self.encrypting
                        and authentic(crypter.envelope, self.table, self.column, row.scope, value)
                    ):
                        proven.add(row.scope)
                continue
            if not self.encrypting:
                return True
            self._refuse_another_mode(wire.parse_header(value), crypter.algorithm)
            if mixed and not self.keep_ciphertext:
                raise self._ciphertext_beside_plaintext()
            return not mixed  # kept: the conversion encrypts the others (see jobs.early)
        # All ciphertext of another scope: touch nothing. Decrypting, so is a column that
        # also holds other values, if one of them is this column's ciphertext under that
        # scope: "done" would leave it there (bytes merely naming its key, an upload say,
        # must not make a finished decrypt_column fail every rerun).
        if (scopes and not mixed) or proven:
            named = ", ".join(map(repr, sorted(scopes)))
            raise ConfigurationError(
                f"{self.table}.{self.column} holds values under keys of scope {named}, not "
                f"{crypter.scope!r}: "
                + (
                    "for a column changing scope, convert it back under its old scope "
                    "(decrypt_column(..., scope=...)), then encrypt it under the new one"
                    if self.encrypting
                    else "if the column was encrypted under that scope, pass it: "
                    f"decrypt_column(..., scope={min(scopes)!r})"
                )
            )
        if unknown and not mixed:  # all ciphertext, of another keyring: touch nothing
            raise ConfigurationError(
                f"{self.table}.{self.column} holds values under data keys this keyring does "
                f"not have ({', '.join(map(str, sorted(unknown)))}): is the envelope "
                "configured with the keyring table the column was encrypted with?"
            )
        return False

    def _ciphertext_beside_plaintext(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self.table}.{self.column} holds this column's ciphertext beside values that are "
            "not ciphertext: code declaring the column Encrypted wrote into it before it was "
            "converted, or code not declaring it wrote plaintext after, or someone copied "
            "another row's ciphertext in. If only your own code can have written the "
            "ciphertext, rerun with keep_ciphertext=True: the other values are encrypted and "
            "the ciphertext is kept as it is. Otherwise write those rows again (or set them "
            "to NULL) first; `verify` counts the values that are not ciphertext. Nothing was "
            "changed"
        )

    def _refuse_another_mode(self, header: tuple[int, int] | None, asked: int) -> None:
        """An encrypted column asked to be encrypted in the other mode is not done."""
        if header is None or header[0] == asked:
            return
        modes = {wire.RANDOMIZED: "randomized", wire.DETERMINISTIC: "deterministic=True"}
        raise ConfigurationError(
            f"{self.table}.{self.column} is encrypted already, {modes.get(header[0], '?')}, "
            f"not {modes[asked]} as asked: to change its mode, declare the new one in the "
            "models and run reencrypt on the table, which rewrites every value in it"
        )

    def _reflect(self, conn: Connection) -> sa.Table:
        with conn.begin():
            return sa.Table(self.table, sa.MetaData(), schema=self.schema, autoload_with=conn)

    def _ddl(self, conn: Connection, clause: str) -> None:
        """``ALTER TABLE`` in the caller's transaction."""
        qt = conn.dialect.identifier_preparer.format_table(sa.table(self.table, schema=self.schema))
        conn.exec_driver_sql(f"ALTER TABLE {qt} {clause}")
