"""What a failed statement's driver error means, on PostgreSQL and MySQL drivers alike.

psycopg, psycopg2 and asyncpg (through SQLAlchemy) carry a SQLSTATE; PyMySQL,
mysqlclient and asyncmy an error number as the first argument.
"""

from __future__ import annotations

import sqlalchemy as sa


def codes(exc: sa.exc.DBAPIError) -> tuple[str | None, object]:
    """The driver's SQLSTATE (PostgreSQL) and error number (MySQL) of a failed statement."""
    orig = exc.orig
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state, args[0] if args else None


def lock_timed_out(exc: sa.exc.DBAPIError) -> bool:
    """A lock wait past the session's limit (PostgreSQL 55P03, MySQL 1205)."""
    state, number = codes(exc)
    return state == "55P03" or number == 1205 or "lock timeout" in str(exc.orig)


def deadlocked(exc: sa.exc.DBAPIError) -> bool:
    """The database chose this transaction as a deadlock's victim (40P01, MySQL 1213)."""
    state, number = codes(exc)
    return state == "40P01" or number == 1213


def lost_race(exc: sa.exc.DBAPIError) -> bool:
    """A transaction lost a race that a new try may win: a unique key taken meanwhile,
    a deadlock or a serialization failure (PostgreSQL 40001)."""
    return isinstance(exc, sa.exc.IntegrityError) or deadlocked(exc) or codes(exc)[0] == "40001"


def denied(exc: sa.exc.DBAPIError) -> bool:
    """A privilege error: PostgreSQL's 42501, MySQL's 1142 and 1143."""
    state, number = codes(exc)
    return state == "42501" if state is not None else number in (1142, 1143)
