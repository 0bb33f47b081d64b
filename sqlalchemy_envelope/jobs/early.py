"""Ciphertext written into a plaintext column before its encryption's swap.

Code that declares a column ``Encrypted`` while ``encrypt_column`` still fills
the shadow (deployed before the swap) writes ciphertext into the plaintext
column: PostgreSQL stores the bytes' text form (``\\x01...``, by an assignment
cast), SQLite a blob; MySQL refuses the write. Encrypting such a value again
would bury the plaintext under two layers. A value that authenticates as this
column's ciphertext is its own encrypted form, so it is copied as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from .. import wire
from ..crypter import ColumnCrypter
from ..errors import EnvelopeError
from .batches import Key
from .writes import BatchWrite

log = logging.getLogger("sqlalchemy_envelope")


def ciphertext_of(crypter: ColumnCrypter) -> Callable[[Any], bytes | None]:
    """``value -> its bytes`` for a value that is the column's ciphertext, else None."""
    text_prefix = f"\\x{wire.VERSION:02x}"  # PostgreSQL's text form of bytea
    version = bytes([wire.VERSION])

    def ciphertext(value: Any) -> bytes | None:
        if type(value) is str:
            if not value.startswith(text_prefix):
                return None
            try:
                raw = bytes.fromhex(value[2:])
            except ValueError:
                return None
        elif isinstance(value, (bytes, bytearray, memoryview)):
            if value[:1] != version:
                return None
            raw = bytes(value)
        else:
            return None
        if wire.parse_header(raw) is None:
            return None
        try:
            crypter.decrypt(raw)
        except EnvelopeError:  # not this column's, or its key is gone: a plaintext value
            return None
        return raw

    return ciphertext


class KeepingCiphertext:
    """A batch write that encrypts plaintext values and copies ciphertext ones as they are."""

    def __init__(
        self, encrypt: BatchWrite, copy: BatchWrite, crypter: ColumnCrypter, where: str
    ) -> None:
        self.encrypt, self.copy, self.where = encrypt, copy, where
        self.ciphertext = ciphertext_of(crypter)

    def __call__(self, conn: Connection, keys: list[Key], news: list[Any]) -> int:
        found = [self.ciphertext(v) for v in news]
        kept = [i for i, raw in enumerate(found) if raw is not None]
        if not kept:
            return self.encrypt(conn, keys, news)
        log.warning(
            "%s: %d value(s) were this column's ciphertext already, written by code that "
            "declares it Encrypted before the swap: copied as they are, not encrypted again "
            "(deploy such code at the swap)",
            self.where,
            len(kept),
        )
        plain = [i for i, raw in enumerate(found) if raw is None]
        written = self.encrypt(conn, [keys[i] for i in plain], [news[i] for i in plain])
        return written + self.copy(conn, [keys[i] for i in kept], [found[i] for i in kept])
