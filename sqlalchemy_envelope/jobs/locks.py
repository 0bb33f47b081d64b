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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .._dberrors import lock_timed_out
from ..errors import TableBusyError
from .batches import log

#: Seconds one try may wait for its locks (and the application's queries behind it).
LOCK_TIMEOUT = 2.0
#: Tries in all; the pauses between them double from FIRST_PAUSE up to MAX_PAUSE seconds
#: (about five minutes in all before TableBusyError).
ATTEMPTS = 20
FIRST_PAUSE, MAX_PAUSE = 1.0, 15.0


T = TypeVar("T")


def briefly_locking(
    conn: Connection,
    what: str,
    step: Callable[[], T],
    *,
    lock: Callable[[], None] | None = None,
    between: Callable[[], None] | None = None,
) -> T:
    """``lock()`` then ``step()``, in a transaction of its own whose lock waits are short.

    ``lock`` takes the table lock the step needs (its first statement). A try
    whose wait runs out is tried again: on PostgreSQL wherever in the
    transaction it ran out, since all of it rolls back; on MySQL only within
    ``lock``, since DDL commits at once there and a retry after it would find
    the table half-changed (a wait that runs out later raises TableBusyError
    at once; the job's next run resumes). Without ``lock``, ``step`` is
    retried whole on MySQL too: it must be safe to repeat (the drops are).
    ``between`` runs before and after each pause (a distributed job renews
    its lease there). On SQLite both run once, in one transaction, as they are.
    """
    dialect = conn.dialect.name
    if dialect not in ("postgresql", "mysql"):
        with conn.begin():
            if lock is not None:
                lock()
            return step()
    pause = FIRST_PAUSE
    for attempt in range(1, ATTEMPTS + 1):
        locked = False
        try:
            with conn.begin(), _short_lock_waits(conn):
                if lock is not None:
                    lock()
                    locked = True
                return step()
        except sa.exc.OperationalError as exc:
            if not lock_timed_out(exc):
                raise
            if locked and dialect == "mysql":
                raise _busy(what, dialect, "its lock") from None
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
            if between is not None:
                between()
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)
            if between is not None:
                between()
    raise _busy(what, dialect, f"{ATTEMPTS} tries")


def _busy(what: str, dialect: str, tries: str) -> TableBusyError:
    sessions = "pg_stat_activity" if dialect == "postgresql" else "SHOW PROCESSLIST"
    return TableBusyError(
        f"{what}: another transaction held the table through {tries} "
        f"(waits of {LOCK_TIMEOUT:g} s); find it in {sessions} (a long or idle-in-transaction "
        "session), end it or wait for it, then run the job again: it resumes where it stopped"
    )


@contextmanager
def _short_lock_waits(conn: Connection) -> Iterator[None]:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{round(LOCK_TIMEOUT * 1000)}ms'")
        yield
        return
    # MySQL: a session setting, so the session's own value is put back at once (the
    # connection returns to a pool); a connection that cannot take it back is discarded.
    previous = int(conn.exec_driver_sql("SELECT @@SESSION.lock_wait_timeout").scalar_one())
    conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {max(1, round(LOCK_TIMEOUT))}")
    try:
        yield
    finally:
        try:
            conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {previous}")
        except sa.exc.DBAPIError:
            conn.invalidate()
            raise
