"""KMS calls are bounded by data keys, not rows: a cold process unwraps each key it touches once.

The three tables of ``tests.models`` have three scopes (``patients``,
``visits``, ``staff``), hence three data keys. A fresh ``Envelope`` on the
same database (what a new process starts with) reads and writes all of them
with three unwraps; sixteen threads starting together, cold, on one scope
cause one.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from sqlalchemy_envelope import KeyProvider, LocalKms
from sqlalchemy_envelope.kms.base import GeneratedKey

from .models import App, Color, build

ROWS = 2_000
THREADS = 16


class CountingKms:
    """A LocalKms that counts unwraps and takes its time, like a KMS across a network."""

    def __init__(self, inner: LocalKms, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.unwraps = 0
        self._lock = threading.Lock()

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        return self.inner.generate_data_key(context)

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        return self.inner.wrap(plaintext, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        with self._lock:
            self.unwraps += 1
        time.sleep(self.delay)
        return self.inner.unwrap(wrapped, context, kms_key_id)

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        return self.inner.rewrap_from(source, wrapped, context, kms_key_id)

    def owns(self, kms_key_id: str) -> bool:
        return self.inner.owns(kms_key_id)


def _rows(a: App, start: int, n: int) -> dict[Any, list[dict[str, Any]]]:
    when = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone.utc)
    ids = range(start + 1, start + n + 1)
    return {
        a.Patient.__table__: [
            {"id": i, "name": f"Patient {i}", "email": f"p{i}@example.org", "ssn": "123-45-6789"}
            for i in ids
        ],
        a.Visit.__table__: [
            {
                "id": uuid.uuid4(),
                "patient_id": i,
                "reason": "checkup",
                "at": when,
                "fee": decimal.Decimal("12.50"),
                "color": Color.RED,
            }
            for i in ids
        ],
        a.Doctor.__table__: [{"id": i, "name": f"Dr. {i}", "plain": "x"} for i in ids],
    }


def _populate(url: str, make_engine: Callable[..., sa.Engine], master: bytes) -> None:
    """A warm process: creates the schema, the three data keys and the rows."""
    warm = build()
    engine = make_engine(url)
    warm.Base.metadata.create_all(engine)
    warm.envelope.configure(kms=LocalKms(master), engine=engine)
    with engine.begin() as conn:
        for table, rows in _rows(warm, 0, ROWS).items():
            conn.execute(table.insert(), rows)
    assert len(warm.envelope.keys()) == 3


def test_cold_process_unwraps_each_key_once(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    master = os.urandom(32)
    _populate(db_url, make_engine, master)

    cold = build()
    kms = CountingKms(LocalKms(master))
    cold.envelope.configure(kms=kms, engine=make_engine(db_url))
    engine = cold.envelope.engine
    with engine.connect() as conn:
        patients = conn.execute(sa.select(cold.Patient.__table__)).all()
        visits = conn.execute(sa.select(cold.Visit.__table__)).all()
        doctors = conn.execute(sa.select(cold.Doctor.__table__)).all()
    assert (len(patients), len(visits), len(doctors)) == (ROWS, ROWS, ROWS)
    assert {p.name for p in patients} == {f"Patient {i}" for i in range(1, ROWS + 1)}
    assert all(v.color is Color.RED and v.fee == decimal.Decimal("12.50") for v in visits)
    assert cold.envelope.stats.kms_calls == 3
    assert kms.unwraps == 3

    # Writing under the same keys costs nothing more.
    with engine.begin() as conn:
        for table, rows in _rows(cold, ROWS, ROWS).items():
            conn.execute(table.insert(), rows)
    assert cold.envelope.stats.kms_calls == 3
    assert kms.unwraps == 3


def test_sixteen_cold_threads_on_one_scope_unwrap_once(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    master = os.urandom(32)
    _populate(db_url, make_engine, master)

    cold = build()
    # A slow unwrap keeps every thread arriving while the first load is in flight.
    kms = CountingKms(LocalKms(master), delay=0.2)
    # Every thread holds a connection while the first one loads the key, and
    # the keyring read needs one more: the pool must not be exactly THREADS.
    engine = make_engine(db_url, pool_size=THREADS, max_overflow=4)
    cold.envelope.configure(kms=kms, engine=engine)
    table = cold.Patient.__table__
    barrier = threading.Barrier(THREADS)
    names: list[list[str]] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            barrier.wait(timeout=30)
            with engine.connect() as conn:
                names.append(list(conn.execute(sa.select(table.c.name).limit(50)).scalars()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(names) == THREADS
    assert all(len(n) == 50 and n[0].startswith("Patient ") for n in names)
    assert cold.envelope.stats.kms_calls == 1
    assert kms.unwraps == 1


def test_sixteen_cold_writers_on_one_scope_unwrap_once(
    db_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    writers = THREADS
    master = os.urandom(32)
    _populate(db_url, make_engine, master)

    cold = build()
    kms = CountingKms(LocalKms(master), delay=0.2)
    connect_args = {"timeout": 60} if db_url.startswith("sqlite") else {}
    engine = make_engine(db_url, pool_size=writers, max_overflow=4, connect_args=connect_args)
    cold.envelope.configure(kms=kms, engine=engine)
    table = cold.Doctor.__table__
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            with engine.begin() as conn:
                conn.execute(table.insert(), {"id": 10 * ROWS + i, "name": f"Dr. new {i}"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    with engine.connect() as conn:
        added = conn.execute(sa.select(table.c.name).where(table.c.id >= 10 * ROWS)).scalars()
        assert sorted(added) == sorted(f"Dr. new {i}" for i in range(writers))
    assert cold.envelope.stats.kms_calls == 1
    assert kms.unwraps == 1
