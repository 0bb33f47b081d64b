"""Batch jobs' lanes: concurrent batches on PostgreSQL, and only where the pool has room."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from sqlalchemy_envelope import LocalKms
from sqlalchemy_envelope.jobs import pg_arrays, reencrypt, verify
from sqlalchemy_envelope.jobs.pages import LANES, lanes, walk

from .models import App, build

N = 400


def patients(url: str, make_engine: Callable[..., sa.Engine], kms: LocalKms, **pool: Any) -> App:
    a = build()
    engine = make_engine(url, **pool)
    a.Base.metadata.create_all(engine)
    a.envelope.configure(kms=kms, engine=engine)
    with Session(engine) as s:
        s.add_all(a.Patient(id=i, name=f"Patient {i}", email=f"p{i}@example.org") for i in range(N))
        s.commit()
    a.envelope.rotate("patients")
    return a


def test_lanes_only_where_they_help_and_the_pool_has_room(
    pg_url: str, sqlite_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    def count(bind: Any) -> int:
        with lanes(bind) as more:
            return len(more)

    engine = make_engine(pg_url)
    assert count(engine) == LANES
    with engine.connect() as conn:
        assert count(conn) == 0  # a Connection keeps to itself
    assert count(make_engine(pg_url, poolclass=sa.NullPool)) == LANES
    assert count(make_engine(pg_url, poolclass=sa.StaticPool)) == 0
    assert count(make_engine(pg_url, pool_size=1, max_overflow=0)) == 0
    small = make_engine(pg_url, pool_size=LANES + 1, max_overflow=0)
    assert count(small) == LANES  # one connection stays free
    with small.connect():  # the application holds one: no room for the lanes and one more
        assert count(small) == 0
    assert count(make_engine(sqlite_url)) == 0


def test_batches_run_on_two_connections(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    a = patients(pg_url, make_engine, local_kms)
    writers: set[int] = set()

    @event.listens_for(a.envelope.engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            writers.add(conn.connection.dbapi_connection.info.backend_pid)

    report = reencrypt(a.envelope, a.Patient, batch_size=20)
    assert report.ok and report.values_rewritten == 2 * N and report.values_changed == 0
    assert len(writers) == LANES
    assert verify(a.envelope, a.Patient).ok


def test_a_full_pool_runs_the_job_on_one_connection(
    pg_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> None:
    # Waiting for a lane's connection would time out after a second: it must not wait.
    a = patients(pg_url, make_engine, local_kms, pool_size=1, max_overflow=0, pool_timeout=1)
    report = reencrypt(a.envelope, a.Patient, batch_size=50)
    assert report.ok and report.values_rewritten == 2 * N


def test_packed_arrays_round_trip(pg_url: str, make_engine: Callable[..., sa.Engine]) -> None:
    values: list[bytes | None] = [b"", b"\x00\\\"{},'", bytes(range(256)) * 40, None, b"x"]
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 12345678901]
    with make_engine(pg_url).connect() as conn:
        pg_arrays.enable(conn)
        got = conn.execute(
            sa.text("SELECT CAST(:b AS bytea[]), CAST(:n AS bytea[]), CAST(:i AS bigint[])"),
            {
                "b": pg_arrays.ByteaArray.of(values),
                "n": pg_arrays.ByteaArray.of([b"a", b"b"]),
                "i": pg_arrays.Int8Array.of(ints),
            },
        ).one()
    assert [None if v is None else bytes(v) for v in got[0]] == values
    assert [bytes(v) for v in got[1]] == [b"a", b"b"]
    assert got[2] == ints


def numbers(
    url: str, make_engine: Callable[..., sa.Engine], rows: int
) -> tuple[sa.Engine, sa.Table]:
    engine = make_engine(url)
    table = sa.Table(
        "numbers",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Integer),
    )
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "v": i} for i in range(1, rows + 1)])
    return engine, table


def test_a_key_changed_during_a_locked_read_skips_no_row(
    pg_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    engine, t = numbers(pg_url, make_engine, 100)
    seen: list[int] = []
    with engine.connect() as app:
        app.begin()
        app.execute(t.update().where(t.c.id == 20).values(id=100_000))  # row 20 is now locked
        with engine.connect() as conn:

            def work(_: sa.Connection, rows: list[sa.Row[Any]]) -> None:
                seen.extend(r.id for r in rows)

            def job() -> None:
                for _ in walk(conn, sa.select(t.c.id), [t.c.id], work, batch_size=20, lock=True):
                    pass

            thread = threading.Thread(target=job)
            thread.start()
            time.sleep(0.5)  # the first page's read now waits for row 20
            app.commit()  # ...which comes back with key 100,000, outside the page
            thread.join(10)
    assert sorted(seen) == [*range(1, 20), *range(21, 101), 100_000]


def test_an_early_stop_cancels_a_lane_waiting_for_a_lock(
    pg_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    engine, t = numbers(pg_url, make_engine, 200)

    class Stop(Exception):
        pass

    with engine.connect() as app, engine.connect() as conn, lanes(engine) as more:
        app.begin()
        app.execute(sa.select(t).where(t.c.id == 30).with_for_update())  # in the second page
        started = time.monotonic()
        with pytest.raises(Stop):
            for _ in walk(
                conn, sa.select(t.c.id), [t.c.id], lambda c, rows: None,
                batch_size=20, lock=True, lanes=more,
            ):  # fmt: skip
                raise Stop  # the caller stops after the first page (say, Ctrl-C)
        # The other lane was waiting for row 30, which the application still holds.
        assert time.monotonic() - started < 5
        app.rollback()
