"""The stored format of an encrypted value (specified byte by byte in docs/FORMAT.md).

    offset  size  field
    0       1     format version (0x01)
    1       1     algorithm: 0x01 AES-256-GCM (randomized), 0x02 AES-SIV (deterministic)
    2       4     data key id, unsigned big-endian (the keyring row's ``id``)
    6       ...   AES-256-GCM: nonce (12) || ciphertext || tag (16)
                  AES-SIV:     synthetic IV (16) || ciphertext

The six header bytes are authenticated as associated data, followed by the
length-prefixed table and column names, so a value moved to another column or
table fails to decrypt. Overhead: 34 bytes randomized, 22 deterministic.
"""

from __future__ import annotations

import struct
from typing import Final

from ._crypto import NONCE_BYTES, SIV_BYTES, TAG_BYTES

VERSION: Final = 0x01
RANDOMIZED: Final = 0x01
DETERMINISTIC: Final = 0x02
ALGORITHM_NAMES: Final = {RANDOMIZED: "AES-256-GCM", DETERMINISTIC: "AES-SIV"}

HEADER_BYTES: Final = 6
MAX_KEY_ID: Final = 2**32 - 1
_HEADER = struct.Struct(">BBI")

#: Bytes a stored value is longer than its serialized plaintext.
OVERHEAD: Final = {
    RANDOMIZED: HEADER_BYTES + NONCE_BYTES + TAG_BYTES,
    DETERMINISTIC: HEADER_BYTES + SIV_BYTES,
}


def header(algorithm: int, key_id: int) -> bytes:
    if not 0 < key_id <= MAX_KEY_ID:
        raise ValueError(f"data key id {key_id} does not fit the format's 32 bits")
    return _HEADER.pack(VERSION, algorithm, key_id)


def stored_bytes(value: object) -> bytes | None:
    """A value read from a binary column, as bytes; None if it is not binary at all.

    SQLite lets any column hold an integer, a real or text.
    """
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def parse_header(value: object) -> tuple[int, int] | None:
    """``(algorithm, key_id)`` of a stored value, or None if it does not look like ours."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if len(value) < HEADER_BYTES + SIV_BYTES:
        return None
    version, algorithm, key_id = _HEADER.unpack_from(value)
    if version != VERSION or algorithm not in OVERHEAD or key_id == 0:
        return None
    if len(value) < OVERHEAD[algorithm]:
        return None
    return algorithm, key_id


def associated_data(head: bytes, table: str, column: str) -> bytes:
    """What each value authenticates besides its ciphertext: header, table and column."""
    parts = [head]
    for name in (table, column):
        raw = name.encode("utf-8")
        parts.append(struct.pack(">H", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def subkey_info(algorithm: int, key_id: int, table: str, column: str) -> bytes:
    """HKDF ``info`` for a column's sub-key: one sub-key per data key, algorithm and column."""
    return associated_data(
        b"sqlalchemy-envelope/v1/column-key" + header(algorithm, key_id), table, column
    )


def key_id_of(value: object) -> int | None:
    parsed = parse_header(value)
    return None if parsed is None else parsed[1]
