"""Key ranges over a primary key, and the connections batch jobs run on.

Batch jobs walk a table in primary-key order, ``batch_size`` rows at a time
(:mod:`sqlalchemy_envelope.jobs.pages`): the next page starts after the last
key seen, so each page costs an index range scan however far the job has
gone. Keys may be single or composite, integers, strings or UUIDs. A range
``(lo, hi]`` bounds a page for workers that claimed a slice of the table
(``None`` is open-ended).
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from ..errors import ConfigurationError

Key = tuple[Any, ...]
LOG_EVERY = 10.0  # seconds between INFO progress lines
Progress = Callable[[int, "int | None"], None]

log = logging.getLogger("sqlalchemy_envelope")

P = ParamSpec("P")
T = TypeVar("T")


def naming_missing_tables(job: Callable[P, T]) -> Callable[P, T]:
    """A job's entry point: a table that is not there is a ConfigurationError saying so."""

    @functools.wraps(job)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return job(*args, **kwargs)
        except sa.exc.NoSuchTableError as exc:
            name = exc.args[0] if exc.args else ""
        raise ConfigurationError(
            f"no table named {name!r} in the database: check the name and the schema"
        )

    return run


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError("batch_size must be a positive integer")
    return batch_size


def sqlite_write_lock(conn: Connection, table: str, schema: str | None, column: str) -> None:
    """Take SQLite's write lock now, in the open transaction.

    pysqlite begins a transaction only on the first write, so reads before it
    run unlocked: a write that changes no row takes the lock first.
    """
    col: sa.ColumnClause[Any] = sa.column(column)
    conn.execute(
        sa.update(sa.table(table, col, schema=schema)).where(sa.false()).values({col: col})
    )


@contextmanager
def connect(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection on which the job may begin and commit one transaction per batch."""
    if isinstance(bind, (Engine, Connection)) and bind.dialect.is_async:
        driver = f"{bind.dialect.name}+{bind.dialect.driver}"
        raise ConfigurationError(
            f"batch jobs run on a synchronous driver, and {driver} is an asyncio one: run "
            "them with the command line tool, or from a script that configures the envelope "
            "with sqlalchemy.create_engine(...) on a synchronous driver for the same "
            "database (such as postgresql+psycopg://, mysql+pymysql:// or sqlite://)"
        )
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            yield conn
        return
    if not isinstance(bind, Connection):
        raise TypeError(f"expected a sqlalchemy Engine or Connection, not {type(bind).__name__}")
    if bind.in_transaction():
        raise ValueError(
            "batch jobs commit once per batch, so they need a connection outside any "
            "transaction (or pass the Engine)"
        )
    yield bind


def primary_key(table: sa.Table) -> list[sa.Column[Any]]:
    from ..errors import ConfigurationError

    pk = list(table.primary_key.columns)
    if not pk:
        raise ConfigurationError(
            f"table {table.name!r} has no primary key, and batch jobs page through tables by it"
        )
    return pk


def _compare(
    cols: Sequence[sa.Column[Any]], key: Key, strict: bool, dialect: str
) -> ColumnElement[bool]:
    """``cols > key`` (``strict``) or ``cols <= key``, in index-friendly SQL."""
    if len(cols) != len(key):
        raise ValueError("a key must have one value per primary-key column")
    if len(cols) == 1:
        single: ColumnElement[bool] = cols[0] > key[0] if strict else cols[0] <= key[0]
        return single
    if dialect in ("postgresql", "sqlite"):
        row = sa.tuple_(*cols)
        other = sa.tuple_(*(sa.literal(v, c.type) for c, v in zip(cols, key, strict=True)))
        return row > other if strict else row <= other
    # (a, b) > (x, y)  ==  a > x OR (a = x AND b > y): MySQL plans it as a range.
    first, rest = cols[0], _compare(cols[1:], key[1:], strict, dialect)
    return sa.or_(first > key[0] if strict else first < key[0], sa.and_(first == key[0], rest))


def in_range(
    cols: Sequence[sa.Column[Any]], lo: Key | None, hi: Key | None, dialect: str
) -> list[ColumnElement[bool]]:
    """WHERE clauses for keys in ``(lo, hi]``."""
    clauses = []
    if lo is not None:
        clauses.append(_compare(cols, lo, True, dialect))
    if hi is not None:
        clauses.append(_compare(cols, hi, False, dialect))
    return clauses


def count(conn: Connection, table: sa.FromClause, *where: ColumnElement[bool]) -> int:
    with conn.begin():
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def boundaries(
    conn: Connection, table: sa.Table, pk: Sequence[sa.Column[Any]], every: int
) -> Iterator[Key]:
    """Every ``every``-th key in order: the upper ends of ``(lo, hi]`` slices of the table."""
    dialect = conn.dialect.name
    last: Key | None = None
    while True:
        stmt = (
            sa.select(*pk)
            .where(*in_range(pk, last, None, dialect))
            .order_by(*pk)
            .offset(every - 1)
            .limit(1)
        )
        with conn.begin():
            row = conn.execute(stmt).first()
        if row is None:
            return
        last = tuple(row)
        yield last


class Ticker:
    """INFO progress lines, at most one every ``LOG_EVERY`` seconds."""

    def __init__(self, job: str, table: str, total: int | None) -> None:
        self.job, self.table, self.total = job, table, total
        self.started = self.last = time.monotonic()

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= LOG_EVERY:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            log.info(
                "%s %s: %d of %s rows (%.0f rows/s)", self.job, self.table, done, self.total, rate
            )


# -- keys as text (for the claims table) -----------------------------------------------
def dump_key(key: Key | None) -> str | None:
    return None if key is None else json.dumps([_tag(v) for v in key], separators=(",", ":"))


def load_key(text: str | None) -> Key | None:
    return None if text is None else tuple(_untag(v) for v in json.loads(text))


def _tag(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    if isinstance(value, dt.datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"date": value.isoformat()}
    raise TypeError(f"primary keys of type {type(value).__name__} are not supported by batch jobs")


def _untag(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, text),) = value.items()
    if kind == "uuid":
        return uuid.UUID(text)
    if kind == "hex":
        return bytes.fromhex(text)
    if kind == "decimal":
        return decimal.Decimal(text)
    if kind == "datetime":
        return dt.datetime.fromisoformat(text)
    return dt.date.fromisoformat(text)
