"""An independent implementation of docs/FORMAT.md, and the generator of its test vectors.

It shares no code with the package: HKDF is written out from RFC 5869 with
``hmac``/``hashlib``, the header and the associated data are packed by hand
here, and only the block ciphers (AES-GCM, AES-SIV) come from ``cryptography``.
The vectors in ``tests/vectors/format.json`` therefore check the package
against the document rather than echo the package.

Regenerate (only when the format changes, which needs a new version byte):

    python -m tests.format_reference
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import struct
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

VECTORS = Path(__file__).parent / "vectors" / "format.json"

VERSION = 0x01
GCM = 0x01
SIV = 0x02
SUBKEY_LABEL = b"sqlalchemy-envelope/v1/column-key"
LOCAL_WRAP_INFO = b"sqlalchemy-envelope/local-kms/wrap/v1"
LOCAL_FINGERPRINT_INFO = b"sqlalchemy-envelope/local-kms/fingerprint/v1"
LOCAL_AAD_LABEL = b"sqlalchemy-envelope/local-kms/v1\x00"


def hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with an absent salt (HashLen zero bytes)."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def header(algorithm: int, key_id: int) -> bytes:
    return bytes([VERSION, algorithm]) + key_id.to_bytes(4, "big")


def names(table: str, column: str) -> bytes:
    t, c = table.encode("utf-8"), column.encode("utf-8")
    return len(t).to_bytes(2, "big") + t + len(c).to_bytes(2, "big") + c


def subkey(data_key: bytes, algorithm: int, key_id: int, table: str, column: str) -> bytes:
    info = SUBKEY_LABEL + header(algorithm, key_id) + names(table, column)
    return hkdf_sha256(data_key, info, 32 if algorithm == GCM else 64)


def seal(
    data_key: bytes,
    algorithm: int,
    key_id: int,
    table: str,
    column: str,
    plaintext: bytes,
    nonce: bytes | None = None,
) -> bytes:
    head = header(algorithm, key_id)
    aad = head + names(table, column)
    key = subkey(data_key, algorithm, key_id, table, column)
    if algorithm == GCM:
        assert nonce is not None and len(nonce) == 12
        return head + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
    return head + AESSIV(key).encrypt(plaintext, [aad])


def open_(data_key: bytes, table: str, column: str, stored: bytes) -> bytes:
    algorithm, key_id = stored[1], int.from_bytes(stored[2:6], "big")
    aad = stored[:6] + names(table, column)
    key = subkey(data_key, algorithm, key_id, table, column)
    if algorithm == GCM:
        return AESGCM(key).decrypt(stored[6:18], stored[18:], aad)
    return AESSIV(key).decrypt(stored[6:], [aad])


def local_kms_wrap(master_key: bytes, scope: str, data_key: bytes, nonce: bytes) -> bytes:
    context = json.dumps(
        {"sqlalchemy-envelope:scope": scope}, sort_keys=True, separators=(",", ":")
    )
    aad = LOCAL_AAD_LABEL + context.encode("ascii")
    wrapping_key = hkdf_sha256(master_key, LOCAL_WRAP_INFO, 32)
    return b"\x01" + nonce + AESGCM(wrapping_key).encrypt(nonce, data_key, aad)


def local_kms_key_id(master_key: bytes) -> str:
    return "local:" + hkdf_sha256(master_key, LOCAL_FINGERPRINT_INFO, 8).hex()


# -- plaintext serialization per inner type (docs/FORMAT.md, section 4) ------------------
# Each entry: inner type (as the test builds it), the value as JSON-able text, the bytes.
def _codec_cases() -> list[dict[str, Any]]:
    aware = dt.datetime(2024, 5, 1, 9, 30, 15, 250000, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    cases: list[tuple[str, str, Any, bytes]] = [
        ("String", "str", "Zoë", "Zoë".encode()),
        ("Text", "str", "", b""),
        ("LargeBinary", "bytes_b64", base64.b64encode(b"\x00\xffab").decode(), b"\x00\xffab"),
        ("Integer", "int", -42, b"-42"),
        ("BigInteger", "int", 2**62, str(2**62).encode()),
        ("Numeric(10, 2)", "decimal", "120.50", b"120.50"),
        ("Numeric(10, 2)", "decimal", "-0.00", b"-0.00"),
        ("Float", "float", 1.5, struct.pack(">d", 1.5)),
        ("Boolean", "bool", True, b"\x01"),
        ("Boolean", "bool", False, b"\x00"),
        ("Date", "date", "2024-02-29", b"2024-02-29"),
        ("DateTime", "datetime", "2024-05-01T09:30:00", b"2024-05-01T09:30:00"),
        ("DateTime(timezone=True)", "datetime", aware.isoformat(), aware.isoformat().encode()),
        ("Time", "time", "23:59:59.000001", b"23:59:59.000001"),
        ("Interval", "timedelta", [-1, 3600, 5], struct.pack(">iII", -1, 3600, 5)),
        ("JSON", "json", {"b": [1, 2.5, None], "a": "é"}, '{"b":[1,2.5,null],"a":"é"}'.encode()),
        ("Uuid", "uuid", str(u), u.bytes),
        ("Enum(Color)", "enum", "BLUE", b"BLUE"),
    ]
    return [
        {"type": t, "kind": kind, "value": value, "plaintext_hex": raw.hex()}
        for t, kind, value, raw in cases
    ]


def _value_cases() -> list[dict[str, Any]]:
    data_key = bytes(range(32))
    other_key = hashlib.sha256(b"sqlalchemy-envelope test vector key 2").digest()
    cases = [
        # algorithm, key id, data key, table, column, plaintext, nonce
        (GCM, 1, data_key, "patients", "name", b"Alice Example", bytes(range(12))),
        (GCM, 1, data_key, "patients", "ssn", b"Alice Example", bytes(range(12))),
        (GCM, 258, other_key, "patients", "name", b"", bytes(12)),
        (GCM, 2**32 - 1, other_key, "t\u00e4ble", "c\u00f6lumn", b"x" * 100, b"\xff" * 12),
        (
            GCM,
            7,
            data_key,
            "visits",
            "notes",
            b'{"allergy":["nuts"]}',
            bytes.fromhex("0102030405060708090a0b0c"),
        ),
        (SIV, 1, data_key, "patients", "email", b"alice@example.org", None),
        (SIV, 1, data_key, "patients", "email2", b"alice@example.org", None),
        (SIV, 1, data_key, "doctors", "email", b"alice@example.org", None),
        (SIV, 2, data_key, "patients", "email", b"alice@example.org", None),
        (SIV, 65536, other_key, "patients", "email", b"", None),
        (SIV, 2**32 - 1, other_key, "t\u00e4ble", "c\u00f6lumn", bytes(range(256)), None),
    ]
    vectors = []
    for algorithm, key_id, key, table, column, plaintext, nonce in cases:
        stored = seal(key, algorithm, key_id, table, column, plaintext, nonce)
        assert open_(key, table, column, stored) == plaintext
        vectors.append(
            {
                "algorithm": "AES-256-GCM" if algorithm == GCM else "AES-SIV",
                "data_key_hex": key.hex(),
                "key_id": key_id,
                "table": table,
                "column": column,
                "plaintext_hex": plaintext.hex(),
                "nonce_hex": nonce.hex() if nonce is not None else None,
                "subkey_hex": subkey(key, algorithm, key_id, table, column).hex(),
                "stored_hex": stored.hex(),
            }
        )
    return vectors


def _local_kms_cases() -> list[dict[str, Any]]:
    master = bytes(range(100, 132))
    cases = [
        ("patients", bytes(range(32)), bytes(range(12))),
        ("staff", bytes(32), b"\x00" * 11 + b"\x01"),
    ]
    return [
        {
            "master_key_b64": base64.b64encode(master).decode(),
            "kms_key_id": local_kms_key_id(master),
            "scope": scope,
            "data_key_hex": key.hex(),
            "nonce_hex": nonce.hex(),
            "wrapped_hex": local_kms_wrap(master, scope, key, nonce).hex(),
        }
        for scope, key, nonce in cases
    ]


def main() -> None:
    # HKDF self-check against RFC 5869 test case 3 (SHA-256, no salt, no info).
    ikm = bytes([0x0B]) * 22
    expected = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert hkdf_sha256(ikm, b"", 42) == expected
    document = {
        "description": "sqlalchemy-envelope stored-value format v1; see docs/FORMAT.md. "
        "Generated by tests/format_reference.py, an implementation independent of the package.",
        "values": _value_cases(),
        "codecs": _codec_cases(),
        "local_kms": _local_kms_cases(),
    }
    VECTORS.parent.mkdir(exist_ok=True)
    VECTORS.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}")


if __name__ == "__main__":
    main()
