"""Walking a table in pages, one transaction each, on one connection or on several.

A batch job's time per page is a database part (read, write, commit) and a
Python part (decrypt, encrypt) that mostly hold different cores. On
PostgreSQL a job walks with :data:`LANES` connections, each running whole
pages in its own transaction, so one lane's Python part overlaps another's
database part. Only the reads take turns, since each page starts after the
last key of the one before; a read that locks its rows (``lock=True``)
holds them until its lane commits, and lanes hold disjoint pages, each
locked in key order, so lanes never wait for each other's rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .batches import Key, in_range, log, sqlite_write_lock

#: Connections a job walks with on PostgreSQL: two overlap the Python and the
#: database halves of a batch; a third gained nothing on two cores (docs/PERFORMANCE.md).
LANES = 2

Work = Callable[[Connection, list[sa.Row[Any]]], None]


@contextmanager
def lanes(bind: Engine | Connection) -> Iterator[list[Connection]]:
    """Connections for :func:`walk` to run pages on concurrently (none if it should not).

    Only an Engine can give more connections, and lanes serve PostgreSQL only,
    where they are measured and tested: SQLite writes one transaction at a
    time, and on MySQL (whose locking reads also lock the gaps next to the
    keys they read) they have not been measured. Lanes are taken only from a
    pool with room for them and one more connection (the application may be
    using it); should it take them meanwhile, the job keeps to one connection
    after the pool's timeout.
    """
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql" or not _room(bind.pool):
        yield []
        return
    with ExitStack() as stack:
        try:
            more = [stack.enter_context(bind.connect()) for _ in range(LANES)]
        except sa.exc.TimeoutError:
            stack.close()
            more = []
        yield more


def _room(pool: sa.pool.Pool) -> bool:
    """Whether ``pool`` can lend :data:`LANES` connections and keep one free."""
    if isinstance(pool, sa.pool.NullPool):
        return True
    if not isinstance(pool, sa.pool.QueuePool):  # static, singleton-thread: one shared connection
        return False
    overflow = pool._max_overflow  # -1: unlimited
    return overflow < 0 or pool.size() + overflow - pool.checkedout() > LANES


def walk(
    conn: Connection,
    query: sa.Select[Any],
    pk: Sequence[sa.Column[Any]],
    work: Work,
    *,
    batch_size: int,
    lo: Key | None = None,
    hi: Key | None = None,
    before_batch: Callable[[], None] | None = None,
    transactions: bool = True,
    lock: bool = False,
    bounded: bool = True,
    lanes: Sequence[Connection] = (),
) -> Iterator[int]:
    """Run ``work(connection, rows)`` on pages of ``query`` (whose first columns are ``pk``).

    A page is the next ``batch_size`` keys of the table: its last key is
    found first (an index-only scan), then ``query`` reads the rows up to it.
    So a page's bounds do not depend on what the query reads: a filter (rows
    already converted) cannot lead the planner to scan and sort the whole
    table for a ``LIMIT`` (it did, on a new column without statistics), and a
    row whose key an application changes while the read waits for its lock
    cannot move the next page past rows not yet read. ``bounded=False`` reads
    ``LIMIT batch_size`` rows of ``query`` instead: one scan for a few rows,
    for a table nobody else can write (under a table lock).

    Each page is read and worked on in one transaction; its number of rows is
    yielded once it has committed. ``before_batch`` runs before each
    transaction begins (to load keys outside it: on SQLite, a key created
    inside would wait for our own write lock). With ``transactions=False`` the
    pages run inside the caller's transaction on ``conn``. With ``lanes``
    (see :func:`lanes`), the pages run on those connections concurrently
    instead, and ``work`` must be thread-safe; closing the iterator early (or
    an error, or Ctrl-C) cancels the lanes' running statements, rolling back
    their pages, and starts no other.

    ``lock`` locks each page's rows as it reads them, in key order (``FOR NO
    KEY UPDATE``, the lock an ``UPDATE`` takes; ``FOR UPDATE`` on MySQL; on
    SQLite, the database's write lock, taken before the read). A job that writes the page
    then holds every lock it needs before its first write, taken in the
    order application writers that lock rows in key order take them too: it
    may make them wait for a batch, but never deadlocks with them, whatever
    order its writes visit the rows in.
    """
    pages = _Pages(query, pk, batch_size, lo, hi, lock, bounded)

    def lane(c: Connection) -> Iterator[int]:
        while True:
            if before_batch is not None:
                before_batch()
            with c.begin() if transactions else nullcontext():
                rows = pages.next(c)
                if rows:
                    work(c, rows)
            if rows is None:
                return
            yield len(rows)

    if not lanes or not transactions:
        yield from lane(conn)
        return
    yield from _concurrently(pages, {c: lane(c) for c in lanes})


class _Pages:
    """The next page to read, handed out to one lane at a time."""

    def __init__(
        self,
        query: sa.Select[Any],
        pk: Sequence[sa.Column[Any]],
        batch_size: int,
        lo: Key | None,
        hi: Key | None,
        lock: bool,
        bounded: bool,
    ) -> None:
        self.query, self.pk, self.batch_size = query, list(pk), batch_size
        self.last, self.hi, self.lock, self.bounded = lo, hi, lock, bounded
        self.stopped = threading.Event()  # not behind `turn`: a read may wait on a row lock
        self.turn = threading.Lock()

    def stop(self) -> None:
        self.stopped.set()

    def next(self, conn: Connection) -> list[sa.Row[Any]] | None:
        """Read the next page on ``conn`` (in its transaction); None once there is none."""
        with self.turn:
            if self.stopped.is_set():
                return None
            pk, dialect, size = self.pk, conn.dialect.name, self.batch_size
            if not self.bounded:
                stmt = self.query.where(*in_range(pk, self.last, self.hi, dialect))
                rows = list(conn.execute(stmt.order_by(*pk).limit(size)).all())
                if len(rows) < size:
                    self.stop()
                if rows:
                    self.last = tuple(rows[-1][: len(pk)])
                return rows or None
            if self.lock and dialect == "sqlite":
                # Or an application update could land between this read and the write.
                key = pk[0]
                sqlite_write_lock(conn, key.table.name, key.table.schema, key.name)
            keys = sa.select(*pk).where(*in_range(pk, self.last, self.hi, dialect))
            edge = conn.execute(keys.order_by(*pk).offset(size - 1).limit(1)).first()
            upper = self.hi if edge is None else tuple(edge)
            stmt = self.query.where(*in_range(pk, self.last, upper, dialect)).order_by(*pk)
            if self.lock:
                stmt = stmt.with_for_update(key_share=True)
            rows = list(conn.execute(stmt).all())
            if edge is None:
                self.stop()
            self.last = upper
            return rows


_END = object()


def _concurrently(pages: _Pages, lanes: dict[Connection, Iterator[int]]) -> Iterator[int]:
    """Run each lane in a thread; yield their counts as they come, raise their first error."""
    results: queue.Queue[Any] = queue.Queue()

    def run(lane: Iterator[int]) -> None:
        try:
            for n in lane:
                results.put(n)
        except BaseException as exc:
            results.put(exc)
        finally:
            results.put(_END)

    threads = [threading.Thread(target=run, args=(lane,), daemon=True) for lane in lanes.values()]
    for thread in threads:
        thread.start()
    running, finished = len(threads), False
    try:
        while running:
            item = results.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
        finished = True
    finally:
        pages.stop()
        if not finished:  # an error, Ctrl-C or an early close: do not wait out a lock
            for conn in lanes:
                _cancel(conn)
        for thread in threads:
            thread.join()
        if not finished:
            while running:
                item = results.get()
                if item is _END:
                    running -= 1
                elif isinstance(item, Exception):  # its type only: messages may quote values
                    log.warning("a batch on another connection ended too: %s", type(item).__name__)


def _cancel(conn: Connection) -> None:
    """Ask the server to cancel ``conn``'s running statement, if any (from another thread)."""
    try:
        dbapi = conn.connection.dbapi_connection
        cancel = getattr(dbapi, "cancel_safe", None) or getattr(dbapi, "cancel", None)
        if cancel is not None:
            cancel()
    except Exception:  # noqa: S110 - already closed, or no statement: nothing to cancel
        pass
