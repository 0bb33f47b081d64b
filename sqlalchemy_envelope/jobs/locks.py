"""Strong table locks that do not stall the application (PostgreSQL, MySQL/MariaDB).

``ALTER TABLE`` and ``LOCK TABLE(S)`` wait for every transaction that has
used the table, and while they wait, every new query on the table waits
behind them: a conversion's swap queued behind one long report would stop
the application for as long as the report runs. So each try at such a step
waits at most :data:`LOCK_TIMEOUT` for its locks (PostgreSQL's ``SET LOCAL
lock_timeout``; MySQL's ``lock_wait_timeout`` for the try, whole seconds);
if that runs out, its transaction rolls back, the application runs on, and
the step is tried again after a pause, :data:`ATTEMPTS` times in all. Then
:class:`~sqlalchemy_envelope.errors.TableBusyError` says which table and
what to do; the conversion keeps its progress and a rerun resumes it.
SQLite has one writer at a time and no such queue: there a step runs once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import TableBusyError
from .batches import log

#: Seconds one try may wait for its locks (and the application's queries behind it).
LOCK_TIMEOUT = 2.0
#: Tries in all; the pauses between them double from FIRST_PAUSE up to MAX_PAUSE seconds
#: (about five minutes in all before TableBusyError).
ATTEMPTS = 20
FIRST_PAUSE, MAX_PAUSE = 1.0, 15.0

_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout
_MYSQL_LOCK_WAIT_TIMEOUT = 1205  # ER_LOCK_WAIT_TIMEOUT

T = TypeVar("T")


def briefly_locking(conn: Connection, what: str, step: Callable[[], T]) -> T:
    """Run ``step`` in a transaction of its own whose lock waits are short, retrying them.

    ``step`` should take its strongest lock first. On SQLite it runs once, in
    one transaction, as it is.
    """
    dialect = conn.dialect.name
    if dialect not in ("postgresql", "mysql"):
        with conn.begin():
            return step()
    pause = FIRST_PAUSE
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with conn.begin():
                if dialect == "mysql":
                    return _mysql_try(conn, step)
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{round(LOCK_TIMEOUT * 1000)}ms'")
                return step()
        except sa.exc.OperationalError as exc:
            if not _lock_timed_out(exc):
                raise
        if attempt < ATTEMPTS:
            log.warning(
                "%s: the table is in use by another transaction (waited %.1f s for its lock); "
                "trying again in %.0f s (%d of %d)",
                what,
                LOCK_TIMEOUT,
                pause,
                attempt,
                ATTEMPTS,
            )
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)
    sessions = "pg_stat_activity" if dialect == "postgresql" else "SHOW PROCESSLIST"
    raise TableBusyError(
        f"{what}: another transaction held the table through {ATTEMPTS} tries of "
        f"{LOCK_TIMEOUT:g} s each; find it in {sessions} (a long or idle-in-transaction "
        "session), end it or wait for it, then run the job again: it resumes where it stopped"
    )


def _mysql_try(conn: Connection, step: Callable[[], T]) -> T:
    # A session setting: restored at once, since the connection goes back to a pool.
    conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {max(1, round(LOCK_TIMEOUT))}")
    try:
        return step()
    finally:
        conn.exec_driver_sql("SET SESSION lock_wait_timeout = DEFAULT")


def _lock_timed_out(exc: sa.exc.OperationalError) -> bool:
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code == _LOCK_NOT_AVAILABLE or "lock timeout" in str(orig):
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())  # PyMySQL, mysqlclient: (errno, message)
    return bool(args) and args[0] == _MYSQL_LOCK_WAIT_TIMEOUT
