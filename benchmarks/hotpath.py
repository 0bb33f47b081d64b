"""The per-value hot path alone: ``Encrypted``'s bind and result processors against the cipher.

No database, no SQLAlchemy execution: each processor is called directly on a
value, and so is the raw cipher (with the ``str``/``bytes`` conversion the
processors also do), in short interleaved runs; the minimum over
the runs is reported (the cost with the least interference from the rest of
the machine). What the processor adds over the cipher is the part of the
overhead that this library's code is responsible for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy.pool import StaticPool

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms

VALUE = "Patient 0012345 Example"


def measure(*, rounds: int = 60, calls: int = 5_000) -> dict[str, float]:
    """Microseconds per value, minimum over ``rounds`` runs of ``calls`` calls each."""
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    randomized = Encrypted(sa.String(200), envelope)
    deterministic = Encrypted(sa.String(200), envelope, deterministic=True)
    table = sa.Table(
        "hot",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("r", randomized),
        sa.Column("d", deterministic),
    )
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    metadata.create_all(engine)
    envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
    with engine.begin() as conn:  # creates and loads the data key
        conn.execute(table.insert(), {"r": VALUE, "d": VALUE})
    dialect = engine.dialect
    seal_r = randomized.bind_processor(dialect)
    open_r = randomized.result_processor(dialect, None)
    seal_d = deterministic.bind_processor(dialect)
    open_d = deterministic.result_processor(dialect, None)
    # As the database returns them: sqlite3 is handed a bytearray and gives back bytes.
    stored_r, stored_d = bytes(seal_r(VALUE)), bytes(seal_d(VALUE))

    aad = b"\x01\x01\x00\x00\x00\x01\x00\x03hot\x00\x01r"
    gcm, siv = AESGCM(os.urandom(32)), AESSIV(os.urandom(64))
    urandom, encrypt, decrypt = os.urandom, gcm.encrypt, gcm.decrypt
    nonce = urandom(12)
    sealed = nonce + encrypt(nonce, VALUE.encode(), aad)
    siv_sealed = siv.encrypt(VALUE.encode(), [aad])

    def gcm_encrypt(value: str) -> bytes:
        nonce = urandom(12)
        return nonce + encrypt(nonce, value.encode(), aad)

    def gcm_decrypt(value: bytes) -> str:
        return decrypt(value[:12], value[12:], aad).decode()

    def siv_encrypt(value: str) -> bytes:
        return siv.encrypt(value.encode(), [aad])

    def siv_decrypt(value: bytes) -> str:
        return siv.decrypt(value, [aad]).decode()

    cases: dict[str, tuple[Callable[[Any], Any], Any]] = {
        "AES-GCM encrypt (floor)": (gcm_encrypt, VALUE),
        "Encrypted bind (randomized)": (seal_r, VALUE),
        "AES-GCM decrypt (floor)": (gcm_decrypt, sealed),
        "Encrypted result (randomized)": (open_r, stored_r),
        "AES-SIV encrypt (floor)": (siv_encrypt, VALUE),
        "Encrypted bind (deterministic)": (seal_d, VALUE),
        "AES-SIV decrypt (floor)": (siv_decrypt, siv_sealed),
        "Encrypted result (deterministic)": (open_d, stored_d),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, (fn, arg) in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(arg)
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    engine.dispose()
    return best


def text(best: dict[str, float]) -> str:
    lines = ["Hot path alone (µs per value, minimum of interleaved runs):"]
    names = list(best)
    for floor, ours in zip(names[::2], names[1::2], strict=True):
        extra = best[ours] - best[floor]
        lines.append(
            f"  {ours:<34}{best[ours]:6.2f}   {floor:<26}{best[floor]:6.2f}   "
            f"ours adds {extra:5.2f} ({best[ours] / best[floor]:.2f}x the cipher)"
        )
    return "\n".join(lines)
