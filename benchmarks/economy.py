"""KMS economy: how many KMS calls a cold process makes.

A warm process writes three tables (three scopes, so three data keys). Then,
on the same database, a fresh ``Envelope`` (what a new process starts with)
reads and writes every table: it should unwrap each data key once, three
calls whatever the row count. Finally sixteen threads start together, cold,
on one scope: their concurrent first uses coalesce into one unwrap.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms

from .systems import row_values
from .workloads import postgres_schema

TABLES = ("econ_a", "econ_b", "econ_c")


def _schema() -> tuple[Envelope, sa.MetaData, dict[str, sa.Table]]:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    tables = {
        name: sa.Table(
            name,
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", Encrypted(sa.String(200), envelope)),
            sa.Column("email", Encrypted(sa.String(320), envelope, deterministic=True)),
        )
        for name in TABLES
    }
    return envelope, metadata, tables


def _counts(envelope: Envelope) -> dict[str, int]:
    s = envelope.stats
    return {"kms_calls": s.kms_calls, "cache_hits": s.cache_hits, "cache_misses": s.cache_misses}


def measure(engine: sa.Engine, *, rows: int, threads: int) -> dict[str, Any]:
    master = os.urandom(32)
    data = row_values(rows)

    # A warm process creates the three keys and the rows.
    envelope, metadata, tables = _schema()
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(master), engine=engine)
    with engine.begin() as conn:
        for table in tables.values():
            conn.execute(table.insert(), data)

    # A cold process: a fresh Envelope on the same database reads and writes all three.
    envelope, _, tables = _schema()
    envelope.configure(kms=LocalKms(master), engine=engine)
    read = 0
    # One transaction per statement: on SQLite a transaction that has written
    # holds the file lock, and a cold key's keyring read needs the file too.
    for table in tables.values():
        with engine.connect() as conn:
            read += len(conn.execute(sa.select(table.c.name, table.c.email)).all())
        with engine.begin() as conn:
            conn.execute(table.insert(), row_values(rows, start=rows))
    cold = {"tables": len(tables), "rows_read": read, "rows_written": rows * len(tables)}
    cold.update(_counts(envelope))

    # Sixteen cold threads on one scope, released together.
    envelope, _, tables = _schema()
    envelope.configure(kms=LocalKms(master), engine=engine)
    table = tables["econ_a"]
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            with engine.begin() as conn:
                conn.execute(sa.select(table.c.name, table.c.email).limit(500)).all()
                conn.execute(table.insert(), row_values(10, start=10 * rows + 10 * i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    burst = {"threads": threads}
    burst.update(_counts(envelope))
    return {"cold_process": cold, "cold_threads": burst}


@contextmanager
def sqlite_file(threads: int) -> Iterator[sa.Engine]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(
            f"sqlite:///{os.path.join(tmp, 'economy.db')}",
            pool_size=threads,
            connect_args={"timeout": 60},
        )
        try:
            yield engine
        finally:
            engine.dispose()


def run(pg_url: str | None, *, rows: int, threads: int = 16) -> dict[str, dict[str, Any]]:
    results = {}
    with sqlite_file(threads) as engine:
        results["sqlite"] = measure(engine, rows=rows, threads=threads)
    if pg_url:
        with postgres_schema(pg_url, pool_size=threads) as engine:
            results["postgresql"] = measure(engine, rows=rows, threads=threads)
    return results
