"""Several workers on one table, coordinated through the database alone.

The first worker to arrive splits the table into primary-key ranges of
``chunk_rows`` rows and writes the plan, one row per range, into a small jobs
table (``<keyring table>_jobs``) in one transaction; a worker that loses that
race uses the winner's plan. Each worker then claims a pending range with a
compare-and-set ``UPDATE`` (after ``SELECT ... FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so workers do not queue on each other's rows), works through it
batch by batch, renews its lease after each batch and marks the range done.
A range whose worker died is claimed again once its lease has run out, or at
once when that worker was a process of this host that is gone. When
every range is done, one worker claims the plan's final step (the column swap
of ``encrypt_column``, say) the same way, and marks the plan done. Every call
returns only when the whole plan is done, so a rerun after a crash resumes
the unfinished ranges and nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError
from .batches import Key, boundaries, dump_key, load_key

if TYPE_CHECKING:
    from ..envelope import Envelope

log = logging.getLogger("sqlalchemy_envelope")

PENDING, RUNNING, DONE = "pending", "running", "done"
FINAL = -1  # the chunk number of the plan's final step (and header row)

Work = Callable[[Key | None, Key | None, Callable[[], None]], None]


class LeaseLost(ConfigurationError):
    """A worker waited past its lease and another took its work over: a longer lease
    avoids it. Said even when the other worker has finished, so the lease gets fixed."""


def jobs_table(name: str, schema: str | None = None) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("job", sa.String(255), primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("lo", sa.Text, nullable=True),
        sa.Column("hi", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),  # epoch milliseconds
        schema=schema,
        comment="sqlalchemy-envelope batch job ranges (safe to drop when no job runs)",
    )


def jobs_table_name(envelope: Envelope) -> str:
    """The table where distributed jobs claim their ranges (created on first use)."""
    return f"{envelope.table.name}_jobs"


def job_name(text: str) -> str:
    """``text``, shortened to fit the jobs table (with a digest, so it stays unique)."""
    if len(text) <= 255:
        return text
    return f"{text[:230]} #{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _machine() -> str:
    """This host, with its PID namespace where it has one: containers that share a host
    name (host networking) must not take each other's process ids for gone."""
    try:
        return f"{socket.gethostname()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def worker_id() -> str:
    return f"{_machine()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:6]}"


def _gone(owner: str | None) -> bool:
    """Whether ``owner`` (a :func:`worker_id`) was a process of this machine that has ended."""
    parts = (owner or "").rsplit(":", 3)  # machine, pid, thread, nonce
    if len(parts) != 4 or parts[0] != _machine() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's: running
        return False
    return False


def forget(conn: Connection, jobs: sa.Table, job: str) -> None:
    """Delete ``job``'s plan, if there is a jobs table (its finished ranges no longer apply)."""
    with conn.begin():
        if sa.inspect(conn).has_table(jobs.name, schema=jobs.schema):
            conn.execute(jobs.delete().where(jobs.c.job == job))


class SharedJob:
    """One worker's part in a job that several workers share through ``jobs``."""

    def __init__(
        self,
        conn: Connection,
        jobs: sa.Table,
        job: str,
        *,
        chunk_rows: int,
        lease: float,
        poll: float | None = None,
        owner: str | None = None,
    ) -> None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError("chunk_rows must be a positive integer")
        if not (isinstance(lease, (int, float)) and lease > 0):
            raise ValueError("lease must be a positive number of seconds")
        self.conn = conn
        self.jobs = jobs
        self.job = job
        self.chunk_rows = chunk_rows
        self.lease_ms = int(lease * 1000)
        self.poll = poll if poll is not None else min(1.0, lease / 4)
        self.owner = owner or worker_id()  # a retry of the same run keeps its claims
        self.waiting: frozenset[int] = frozenset()  # the ranges last logged as held elsewhere

    def run(
        self,
        table: sa.Table,
        pk: list[sa.Column[Any]],
        work: Work,
        final: Callable[[Callable[[], None]], None],
    ) -> None:
        """Work through claimed ranges until the whole plan, final step included, is done.

        ``final(renew)`` should call ``renew()`` while it waits (its lease runs
        out otherwise).
        """
        self._create_table()
        self._plan(table, pk)
        while True:
            claimed = self._claim(final=False)
            if claimed is not None:
                chunk, lo, hi = claimed
                log.info("job %r: worker %s claimed range %d", self.job, self.owner, chunk)
                work(lo, hi, lambda chunk=chunk: self._renew(chunk))  # type: ignore[misc]
                self._set(chunk, state=DONE)
                continue
            states = self._states()
            if not states:  # the plan was replaced under us: join the new one
                self._plan(table, pk)
                continue
            if states.get(FINAL) == DONE:
                return
            ranges_done = all(state == DONE for chunk, state in states.items() if chunk != FINAL)
            if ranges_done and self._claim(final=True) is not None:
                log.info("job %r: worker %s runs the final step", self.job, self.owner)
                final(lambda: self._renew(FINAL, strict=True))
                self._set(FINAL, state=DONE)
                log.info("job %r: done", self.job)
                return
            time.sleep(self.poll)  # other workers hold the remaining ranges

    # -- the jobs table ----------------------------------------------------------------
    def _create_table(self) -> None:
        try:
            with self.conn.begin():
                self.jobs.create(self.conn, checkfirst=True)
        except sa.exc.DBAPIError:  # another worker created it at the same moment
            with self.conn.begin():
                if not sa.inspect(self.conn).has_table(self.jobs.name, schema=self.jobs.schema):
                    raise

    def _plan(self, table: sa.Table, pk: list[sa.Column[Any]]) -> None:
        j = self.jobs.c
        with self.conn.begin():
            header = self.conn.execute(
                sa.select(j.plan, j.state).where(j.job == self.job, j.chunk == FINAL)
            ).first()
        if header is not None and header.state != DONE:
            log.info("job %r: joining the existing plan", self.job)
            return
        plan = uuid.uuid4().hex
        edges = [None, *boundaries(self.conn, table, pk, self.chunk_rows), None]
        rows = [
            {"job": self.job, "chunk": n, "plan": plan, "lo": dump_key(lo), "hi": dump_key(hi)}
            for n, (lo, hi) in enumerate(itertools.pairwise(edges))
        ]
        rows.append({"job": self.job, "chunk": FINAL, "plan": plan, "lo": None, "hi": None})
        try:
            with self.conn.begin():
                if header is not None:  # a finished plan of an earlier run
                    self.conn.execute(
                        self.jobs.delete().where(j.job == self.job, j.plan == header.plan)
                    )
                self.conn.execute(self.jobs.insert(), [{**r, "state": PENDING} for r in rows])
        except sa.exc.IntegrityError:
            log.info("job %r: another worker planned it first; joining", self.job)
            return
        log.info(
            "job %r: planned %d ranges of up to %d rows", self.job, len(rows) - 1, self.chunk_rows
        )

    def _claim(self, *, final: bool) -> tuple[int, Key | None, Key | None] | None:
        j = self.jobs.c
        while True:
            now = _now_ms()
            claimable = sa.or_(j.state == PENDING, sa.and_(j.state == RUNNING, j.lease_until < now))
            which = j.chunk == FINAL if final else j.chunk >= 0
            stmt = sa.select(j.chunk, j.lo, j.hi, j.owner).where(j.job == self.job, which)
            stmt = stmt.where(claimable).order_by(j.chunk).limit(1)
            if self.conn.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            with self.conn.begin():
                row = self.conn.execute(stmt).first()
                if row is None:
                    row = self._orphan(which, now)
                if row is None:
                    return None
                unchanged = sa.and_(j.state == RUNNING, j.owner == row.owner)
                won = self.conn.execute(
                    self.jobs.update()
                    .where(j.job == self.job, j.chunk == row.chunk, sa.or_(claimable, unchanged))
                    .values(state=RUNNING, owner=self.owner, lease_until=now + self.lease_ms)
                ).rowcount
            if won == 1:
                self.waiting = frozenset()
                return row.chunk, load_key(row.lo), load_key(row.hi)

    def _orphan(self, which: sa.ColumnElement[bool], now: int) -> Any:
        """A running range whose worker is gone: this one before a retry, or a process of
        this machine that has ended (claimed at once). Else log what we wait for, once."""
        j = self.jobs.c
        held = self.conn.execute(
            sa.select(j.chunk, j.lo, j.hi, j.owner, j.lease_until)
            .where(j.job == self.job, which, j.state == RUNNING)
            .order_by(j.chunk)
        ).all()
        for row in held:
            if row.owner == self.owner or _gone(row.owner):
                return row
        chunks = frozenset(row.chunk for row in held)
        if chunks and chunks != self.waiting:
            wait = max(0, max(row.lease_until or now for row in held) - now) / 1000
            log.info(
                "job %r: waiting for %d range(s) held by other workers, at most %.0f s "
                "(until they finish, or their leases run out if they died)",
                self.job, len(chunks), wait,
            )  # fmt: skip
        self.waiting = chunks
        return None

    def _renew(self, chunk: int, *, strict: bool = False) -> None:
        """Extend our lease on ``chunk``; ``strict``: raise if another worker took it over."""
        j = self.jobs.c
        with self.conn.begin():
            renewed = self.conn.execute(
                self.jobs.update()
                .where(
                    j.job == self.job, j.chunk == chunk, j.owner == self.owner, j.state == RUNNING
                )
                .values(lease_until=_now_ms() + self.lease_ms)
            ).rowcount
        if strict and renewed == 0:
            raise LeaseLost(
                f"job {self.job!r}: worker {self.owner} waited past its lease of "
                f"{self.lease_ms / 1000:g} s and another worker took over the final step; "
                "a longer lease avoids this"
            )

    def _set(self, chunk: int, *, state: str) -> None:
        # Unconditional: whoever finishes a range has done all of it, even if a
        # slower worker's lease ran out and another worker claimed it too.
        j = self.jobs.c
        with self.conn.begin():
            self.conn.execute(
                self.jobs.update().where(j.job == self.job, j.chunk == chunk).values(state=state)
            )

    def _states(self) -> dict[int, str]:
        j = self.jobs.c
        with self.conn.begin():
            rows = self.conn.execute(sa.select(j.chunk, j.state).where(j.job == self.job))
            return {chunk: state for chunk, state in rows}
