"""A scope's first key under concurrency: threads (SQLite file, Postgres) and processes (Postgres).

Creating the first key races: every writer finds no active key and asks the
KMS for one. The keyring's unique ``active_scope`` lets exactly one insert
win; the others use the winner's key. The key row commits on its own, so a
rolled-back application transaction never strands ciphertext.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import LocalKms, RotationConflictError, keyring, wire
from sqlalchemy_envelope.keyring import Keyring

from .models import App, build

THREADS = 8
ROWS_PER_WORKER = 5


def setup_app(url: str, master: bytes, *, create: bool) -> tuple[App, sa.Engine]:
    app = build()
    engine = (
        sa.create_engine(url, pool_size=THREADS + 2)
        if "sqlite" not in url
        else sa.create_engine(url)
    )
    if create:
        app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=LocalKms(master), engine=engine)
    return app, engine


def close(app: App, engine: sa.Engine) -> None:
    app.envelope.dispose()
    engine.dispose()


def write_rows(app: App, engine: sa.Engine, worker: int) -> None:
    for i in range(ROWS_PER_WORKER):
        row_id = worker * 100 + i + 1  # never 0: MySQL would take it for "next id"
        with Session(engine) as s:
            s.add(app.Patient(id=row_id, name=f"name-{row_id}", email=f"{row_id}@x.org"))
            s.commit()


def check_all(app: App, engine: sa.Engine, workers: int) -> set[int]:
    """Every row reads back exactly; returns the key ids the values use."""
    with Session(engine) as s:
        rows = {p.id: (p.name, p.email) for p in s.scalars(sa.select(app.Patient))}
    ids = [w * 100 + i + 1 for w in range(workers) for i in range(ROWS_PER_WORKER)]
    expected = {n: (f"name-{n}", f"{n}@x.org") for n in ids}
    assert rows == expected
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT name, email FROM patients")).all()
    return {wire.key_id_of(bytes(v)) for row in stored for v in row}  # type: ignore[misc]


def test_first_use_from_eight_threads(db_url: str) -> None:
    app, engine = setup_app(db_url, os.urandom(32), create=True)
    barrier = threading.Barrier(THREADS)

    def worker(n: int) -> None:
        barrier.wait()
        write_rows(app, engine, n)

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(worker, n) for n in range(THREADS)]:
                future.result()
        keys = app.envelope.keys("patients")
        assert [k.state for k in keys] == ["active"], keys
        assert check_all(app, engine, THREADS) == {keys[0].id}
        assert app.envelope.stats.keys_created >= 1
    finally:
        close(app, engine)


ROTATING_THREADS = 6
ROTATIONS_PER_THREAD = 8


def test_concurrent_rotations_leave_one_active_key(any_db_url: str) -> None:
    """Rotations racing on one scope all succeed: a lost race, a deadlock (MySQL) or a
    serialization failure is retried with the same wrapped key, never surfaced."""
    app, engine = setup_app(any_db_url, os.urandom(32), create=True)
    try:
        write_rows(app, engine, 0)
        barrier = threading.Barrier(ROTATING_THREADS)

        def rotate(_: int) -> list[int]:
            barrier.wait()
            return [app.envelope.rotate("patients") for _ in range(ROTATIONS_PER_THREAD)]

        calls = app.envelope.stats.kms_calls
        with ThreadPoolExecutor(ROTATING_THREADS) as pool:
            new_ids = {i for ids in pool.map(rotate, range(ROTATING_THREADS)) for i in ids}
        rotations = ROTATING_THREADS * ROTATIONS_PER_THREAD
        assert app.envelope.stats.kms_calls - calls == rotations  # one GenerateDataKey each
        keys = app.envelope.keys("patients")
        assert len(new_ids) == rotations
        active = [k.id for k in keys if k.state == "active"]
        assert len(active) == 1 and active[0] in new_ids
        assert len(keys) == rotations + 1  # the first key and every rotation, all kept
        write_rows(app, engine, 1)
        used = check_all(app, engine, 2)
        assert used <= {k.id for k in keys}
    finally:
        close(app, engine)


def test_a_rotation_that_loses_every_race_says_to_rotate_again(
    any_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, engine = setup_app(any_db_url, os.urandom(32), create=True)
    original = Keyring._insert_active

    def colliding(self: Keyring, conn: sa.Connection, *args: Any) -> Any:
        original(self, conn, *args)
        return original(self, conn, *args)  # a second active key: the unique constraint refuses

    try:
        write_rows(app, engine, 0)
        before = app.envelope.keys("patients")
        monkeypatch.setattr(keyring, "_ROTATE_ATTEMPTS", 3)
        monkeypatch.setattr(keyring, "_ROTATE_BACKOFF", 0.0)
        monkeypatch.setattr(Keyring, "_insert_active", colliding)
        calls = app.envelope.stats.kms_calls
        with pytest.raises(RotationConflictError, match=r"'patients'.* 3 times; nothing changed"):
            app.envelope.rotate("patients")
        assert app.envelope.stats.kms_calls == calls + 1  # the tries reuse one wrapped key
        assert app.envelope.keys("patients") == before
    finally:
        close(app, engine)


def test_rolled_back_transaction_keeps_its_key_row(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    app, engine = setup_app(db_url, os.urandom(32), create=True)
    observer = make_engine(db_url, poolclass=sa.NullPool)
    try:
        with Session(engine) as s:
            s.add(app.Patient(id=1, name="rolled back", email="rb@x.org"))
            s.flush()  # the first key is created, committed on its own connection
            with observer.connect() as conn:
                t = app.envelope.table
                states = conn.execute(sa.select(t.c.state).where(t.c.scope == "patients")).all()
            assert [r.state for r in states] == ["active"]
            s.rollback()
        assert [k.state for k in app.envelope.keys("patients")] == ["active"]
        write_rows(app, engine, 0)
        check_all(app, engine, 1)
    finally:
        close(app, engine)


# -- two processes ----------------------------------------------------------------------
def _process_worker(url: str, master: bytes, worker: int, barrier: Any, errors: Any) -> None:
    try:
        app, engine = setup_app(url, master, create=False)
        barrier.wait(timeout=60)
        write_rows(app, engine, worker)
        close(app, engine)
    except BaseException as exc:  # reported to the parent
        errors.put(f"worker {worker}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("processes", [2, 4])
def test_first_use_from_several_processes(pg_url: str, processes: int) -> None:
    master = os.urandom(32)
    app, engine = setup_app(pg_url, master, create=True)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    errors = ctx.Queue()
    workers = [
        ctx.Process(target=_process_worker, args=(pg_url, master, n, barrier, errors))
        for n in range(processes)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
    assert all(p.exitcode == 0 for p in workers)
    try:
        keys = app.envelope.keys("patients")
        active = [k for k in keys if k.state == "active"]
        used = check_all(app, engine, processes)
        # One active key; any other key a racing process used must still decrypt (above).
        assert len(active) == 1
        assert used <= {k.id for k in keys}
    finally:
        close(app, engine)
