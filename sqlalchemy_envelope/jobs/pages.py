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

from .batches import Key, in_range

#: Connections a job walks with on PostgreSQL: two overlap the Python and the
#: database halves of a batch; more only queue for the same two cores' worth.
LANES = 2

Work = Callable[[Connection, list[sa.Row[Any]]], None]


@contextmanager
def lanes(bind: Engine | Connection) -> Iterator[list[Connection]]:
    """Connections for :func:`walk` to run pages on concurrently (none if it should not).

    Only an Engine can give more connections, and lanes serve PostgreSQL only,
    where they are measured and tested: SQLite writes one transaction at a
    time, and on MySQL (whose locking reads also lock the gaps next to the
    keys they read) they have not been measured. The lanes never wait for a
    connection: with no room for them in the engine's pool (the application
    may be using it), the job keeps to one.
    """
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql" or not _room(bind.pool):
        yield []
        return
    with ExitStack() as stack:
        yield [stack.enter_context(bind.connect()) for _ in range(LANES)]


def _room(pool: sa.pool.Pool) -> bool:
    """Whether ``pool`` can lend :data:`LANES` more connections right now."""
    if isinstance(pool, sa.pool.NullPool):
        return True
    if not isinstance(pool, sa.pool.QueuePool):  # static, singleton-thread: one shared connection
        return False
    overflow = pool._max_overflow  # -1: unlimited
    return overflow < 0 or pool.size() + overflow - pool.checkedout() >= LANES


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
    filtered: bool = False,
    lanes: Sequence[Connection] = (),
) -> Iterator[int]:
    """Run ``work(connection, rows)`` on pages of ``query`` (whose first columns are ``pk``).

    Each page is read and worked on in one transaction; its number of rows is
    yielded once it has committed. ``before_batch`` runs before each
    transaction begins (to load keys outside it: on SQLite, a key created
    inside would wait for our own write lock). With ``transactions=False`` the
    pages run inside the caller's transaction on ``conn``. With ``lanes``
    (see :func:`lanes`), the pages run on those connections concurrently
    instead, and ``work`` must be thread-safe; closing the iterator early
    lets the pages in progress commit, and starts no other.

    ``lock`` locks each page's rows as it reads them, in key order (``FOR NO
    KEY UPDATE``, the lock an ``UPDATE`` takes; ``FOR UPDATE`` on MySQL;
    SQLite locks the whole database instead). A job that writes the page
    then holds every lock it needs before its first write, taken in the
    order application writers that lock rows in key order take them too: it
    may make them wait for a batch, but never deadlocks with them, whatever
    order its writes visit the rows in.

    ``filtered`` says that ``query`` skips rows (say, those already
    converted). A page is then the next ``batch_size`` keys of the table,
    found first, and the query reads the rows between them: a ``LIMIT`` over
    a filter lets the planner guess how far the index must be scanned, and
    when it guesses wrong (a new column has no statistics) it scans and sorts
    the whole table for every page.
    """
    pages = _Pages(query, pk, batch_size, lo, hi, lock, filtered)

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
    yield from _concurrently(pages, [lane(c) for c in lanes])


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
        filtered: bool,
    ) -> None:
        self.query, self.pk, self.batch_size = query, list(pk), batch_size
        self.last, self.hi, self.lock, self.filtered = lo, hi, lock, filtered
        self.done = False
        self.turn = threading.Lock()

    def stop(self) -> None:
        with self.turn:
            self.done = True

    def next(self, conn: Connection) -> list[sa.Row[Any]] | None:
        """Read the next page on ``conn`` (in its transaction); None once there is none."""
        with self.turn:
            if self.done:
                return None
            pk, dialect, size = self.pk, conn.dialect.name, self.batch_size
            upper = self.hi
            if self.filtered:
                page = sa.select(*pk).where(*in_range(pk, self.last, self.hi, dialect))
                edge = conn.execute(page.order_by(*pk).offset(size - 1).limit(1)).first()
                upper = self.hi if edge is None else tuple(edge)
            stmt = self.query.where(*in_range(pk, self.last, upper, dialect)).order_by(*pk)
            if not self.filtered:
                stmt = stmt.limit(size)
            if self.lock:
                stmt = stmt.with_for_update(key_share=True)
            rows = list(conn.execute(stmt).all())
            if self.filtered:
                self.done, self.last = edge is None, upper
                return rows
            if not rows:
                self.done = True
                return None
            self.done, self.last = len(rows) < size, tuple(rows[-1][: len(pk)])
            return rows


_END = object()


def _concurrently(pages: _Pages, lanes: list[Iterator[int]]) -> Iterator[int]:
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

    threads = [threading.Thread(target=run, args=(lane,), daemon=True) for lane in lanes]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = results.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        pages.stop()
        for thread in threads:
            thread.join()
