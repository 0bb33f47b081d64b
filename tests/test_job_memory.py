"""Batch jobs hold one batch in memory, whatever the table size (the 1M-row run is a benchmark)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms
from sqlalchemy_envelope.jobs import encrypt_column, reencrypt, verify

BATCH = 100


def peak_of(job: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        job()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(tmp_path: Path, rows: int, kms: LocalKms) -> dict[str, int]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / f'{rows}.db'}")
    envelope = Envelope(sa.MetaData())
    envelope.metadata.create_all(engine)  # type: ignore[union-attr]
    envelope.configure(kms=kms, engine=engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(
            sa.text("INSERT INTO docs (id, body) VALUES (:id, :body)"),
            [{"id": i, "body": f"{i:08d}" * 64} for i in range(1, rows + 1)],
        )
    type_ = Encrypted(sa.Text)
    peaks = {
        "encrypt_column": peak_of(
            lambda: encrypt_column(envelope, engine, "docs", "body", type_, batch_size=BATCH)
        )
    }
    envelope.rotate("docs")
    reencrypt(envelope, "docs", batch_size=BATCH, columns=["body"])  # warm-up
    envelope.rotate("docs")
    peaks["reencrypt"] = peak_of(lambda: reencrypt(envelope, "docs", batch_size=BATCH))
    peaks["verify"] = peak_of(lambda: verify(envelope, "docs", batch_size=BATCH))
    engine.dispose()
    return peaks


def test_peak_memory_does_not_grow_with_the_table(tmp_path: Path, local_kms: LocalKms) -> None:
    (tmp_path / "warm").mkdir()
    measure(tmp_path / "warm", 50, local_kms)  # imports and statement caches, not counted
    small = measure(tmp_path, 1000, local_kms)
    large = measure(tmp_path, 8000, local_kms)
    for job in small:
        # Eight times the rows (4 MB of text), the same peak: one batch, about 350 kB here.
        assert large[job] < small[job] * 1.5 + 256 * 1024, (job, small[job], large[job])
