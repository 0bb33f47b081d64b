"""Ciphertext found in a plaintext column while it is being encrypted.

Code that declares a column ``Encrypted`` while ``encrypt_column`` still fills
the shadow (deployed before the swap) writes ciphertext into the plaintext
column: PostgreSQL stores the bytes' text form (``\\x01...``, by an assignment
cast), SQLite a blob; MySQL refuses the write, except into a ``latin1``
column. Encrypting such a value again would bury the plaintext under two
layers. Copying it as it is would be right for the application's own
writes, but not for a value copied from another row by someone who can
write plaintext through the old application and read the shadow column in
a dump: the row would then decrypt to the other row's value. The two
cannot be told apart, so such values stop the job, unless the operator,
knowing only their own code wrote them, asks to keep them.

Values are told apart as the database returns them, before the column's
type reads them (:class:`Classified`): on SQLite a ``Boolean`` would make
``True`` of such bytes, and a ``Date`` fail on them; MySQL returns a
``latin1`` column's bytes as text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from .. import wire
from ..crypter import ColumnCrypter
from ..errors import ConfigurationError, DecryptionError, KeyNotFoundError
from .batches import Key
from .writes import BatchWrite

#: Primary keys named in the refusal, at most.
LISTED = 5


def _mysql_latin1(byte: int) -> str:
    # MySQL's latin1 is cp1252, with the five bytes cp1252 leaves undefined kept as such.
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


#: The character MySQL returns for each byte of a ``latin1`` column, reversed.
_FROM_MYSQL_LATIN1 = {ord(_mysql_latin1(b)): b for b in range(256)}


def ciphertext_of(crypter: ColumnCrypter) -> Callable[[Any], bytes | None]:
    """``value -> its bytes`` for a value that is the column's ciphertext, else None.

    A KMS failure propagates: a value it could not check is neither plaintext
    nor ciphertext yet.
    """
    text_prefix = f"\\x{wire.VERSION:02x}"  # PostgreSQL's text form of bytea
    version = bytes([wire.VERSION])
    latin1_version = chr(wire.VERSION)

    def ciphertext(value: Any) -> bytes | None:
        if type(value) is str:
            if value.startswith(latin1_version):
                try:  # bytes a MySQL latin1 column took, returned as text
                    raw = bytes(map(_FROM_MYSQL_LATIN1.__getitem__, map(ord, value)))
                except KeyError:
                    return None
            elif value.startswith(text_prefix):
                value = value.rstrip(" ")  # as a CHAR(n) column pads it
                if not value[2:].isalnum():
                    return None
                try:
                    raw = bytes.fromhex(value[2:])
                except ValueError:
                    return None
            else:
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
        except (DecryptionError, KeyNotFoundError):  # not this column's, or its key is gone
            return None
        return raw

    return ciphertext


class Found(NamedTuple):
    """A value read from the plaintext column that is the column's ciphertext."""

    raw: bytes


class Classified(sa.types.TypeDecorator[Any]):
    """``read``, the type the plaintext is read through, for values that are not the
    column's ciphertext; those become :class:`Found`, untouched by ``read``."""

    impl = sa.types.NullType
    cache_ok = False  # holds a crypter

    def __init__(self, read: sa.types.TypeEngine[Any], crypter: ColumnCrypter) -> None:
        super().__init__()
        self.read = read
        self.ciphertext = ciphertext_of(crypter)

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        return self.read

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        typed = self.impl_instance.result_processor(dialect, coltype)
        ciphertext = self.ciphertext
        # How ciphertext can begin (as bytes; as MySQL latin1 text, or PostgreSQL's text
        # form): most plaintext is told by its first character, without a call. Apart, as
        # a str and a bytes of one character hash alike: comparing them warns under -b.
        first_byte = bytes([wire.VERSION])
        first_chars = frozenset((chr(wire.VERSION), "\\"))

        def process(value: Any) -> Any:
            if value is None:
                return None
            kind = type(value)
            if kind is str:
                maybe = value[:1] in first_chars
            elif kind is bytes:
                maybe = value[:1] == first_byte
            else:
                maybe = True
            if maybe:
                raw = ciphertext(value)
                if raw is not None:
                    return Found(raw)
            return value if typed is None else typed(value)

        return process


class EarlyCiphertext:
    """A batch write that encrypts plaintext values and refuses (or, when told to keep
    them, copies as they are) values that are the column's ciphertext already."""

    def __init__(
        self,
        encrypt: BatchWrite,
        copy: BatchWrite,
        crypter: ColumnCrypter,
        where: str,
        *,
        keep: bool,
    ) -> None:
        self.encrypt, self.copy, self.where, self.keep = encrypt, copy, where, keep
        self.algorithm = crypter.algorithm

    def __call__(self, conn: Connection, keys: list[Key], news: list[Any]) -> int:
        """Write ``news``, read through :class:`Classified`."""
        found = [v.raw if type(v) is Found else None for v in news]
        kept = [i for i, raw in enumerate(found) if raw is not None]
        if not kept:
            return self.encrypt(conn, keys, news)
        if not self.keep or not all(self._same_mode(found[i]) for i in kept):
            raise self._refusal([keys[i] for i in kept])
        plain = [i for i, raw in enumerate(found) if raw is None]
        written = self.encrypt(conn, [keys[i] for i in plain], [news[i] for i in plain])
        return written + self.copy(conn, [keys[i] for i in kept], [found[i] for i in kept])

    def _same_mode(self, raw: bytes | None) -> bool:
        header = None if raw is None else wire.parse_header(raw)
        return header is not None and header[0] == self.algorithm

    def _refusal(self, keys: list[Key]) -> ConfigurationError:
        shown = [str(k[0]) if len(k) == 1 else str(k) for k in keys[:LISTED]]
        named = ", ".join(shown) + (", ..." if len(keys) > LISTED else "")
        return ConfigurationError(
            f"{self.where}: rows with primary key {named} hold this column's ciphertext, not "
            "plaintext: written by code declaring the column Encrypted before the swap, or "
            "copied from another row. Encrypting them again would bury their values under "
            "two layers, and copying them would let whoever copied them read the rows they "
            "came from. Write those rows again through the old code (or set them to NULL) "
            "and rerun; or, if only your own code can have written them, rerun with "
            "keep_ciphertext=True (values in the other mode are refused even then). "
            "Nothing was converted in this batch; the job resumes"
        )
