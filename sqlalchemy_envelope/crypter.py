"""Encrypts and decrypts the bytes of one column (the codec-free layer).

A ``ColumnCrypter`` knows its table, column, scope and mode, derives one
sub-key per data key and remembers the resulting ciphers, keyed by the six
header bytes that every stored value starts with. The column type wraps it
with a codec; the batch jobs and the CLI use it directly on bytes, which is
how they work from the database alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from . import wire
from ._crypto import AuthenticationFailed, SealAll, column_cipher
from .cache import clock
from .errors import DecryptionError, EnvelopeError, KeyNotFoundError, where
from .keys import KeyOfAnotherScope

if TYPE_CHECKING:
    from .envelope import Envelope
    from .keys import DataKey


class Cipher(NamedTuple):
    expires: float
    key_id: int
    head: bytes
    seal: Callable[[bytes], bytes]
    open: Callable[[bytes], bytes]
    #: ``seal_all(head, plaintexts)``: stored values, nonces drawn at once (batch jobs)
    seal_all: SealAll


class ColumnCrypter:
    def __init__(
        self,
        envelope: Envelope,
        table: str,
        column: str,
        *,
        scope: str | None = None,
        deterministic: bool,
    ) -> None:
        self.envelope = envelope
        self.table = table
        self.column = column
        self.scope = scope or table
        self.deterministic = deterministic
        self.algorithm = wire.DETERMINISTIC if deterministic else wire.RANDOMIZED
        #: header bytes -> cipher; read by the hot path without a lock (dict
        #: reads and writes are atomic, and a lost write only costs a re-derive).
        self.ciphers: dict[bytes, Cipher] = {}
        self.active: Cipher | None = None
        self._warm_until = 0.0
        #: When the last statement that prefetched for this column (asyncio Core) began.
        self._statement_began = 0.0
        envelope._subscribe(self)

    def __repr__(self) -> str:
        mode = "deterministic" if self.deterministic else "randomized"
        return f"ColumnCrypter({self.table}.{self.column}, scope={self.scope!r}, {mode})"

    def __reduce__(self) -> Any:
        raise TypeError("a column crypter cannot be pickled")

    def where(self, key_id: int | None = None) -> str:
        return where(self.table, self.column, key_id)

    # -- slow paths (the hot path lives in the column type's processors) -------------
    def _cipher(self, algorithm: int, key: DataKey, expires: float) -> Cipher:
        """The cipher of ``key`` for this column, derived once per key and ``cache_ttl``."""
        head = wire.header(algorithm, key.id)
        cipher = self.ciphers.get(head)
        if cipher is not None and cipher.expires >= expires:
            return cipher
        now = clock()  # a key derived anew: drop the sub-keys of expired ones meanwhile
        for stale in [h for h, c in list(self.ciphers.items()) if c.expires <= now]:
            self.ciphers.pop(stale, None)
        seal, open_, seal_all = column_cipher(
            algorithm == wire.DETERMINISTIC,
            key.material,
            wire.subkey_info(algorithm, key.id, self.table, self.column),
            wire.associated_data(head, self.table, self.column),
            wire.HEADER_BYTES,
        )
        cipher = Cipher(expires, key.id, head, seal, open_, seal_all)
        self.ciphers[head] = cipher
        return cipher

    def for_writing(self) -> Cipher:
        """The cipher under the scope's active key (creating the key if needed)."""
        cipher = self.active
        if cipher is None or cipher.expires <= clock():
            expires, checked_until, key = self.envelope._keys().active_key(self.scope)
            cipher = self._cipher(self.algorithm, key, expires)
            # Ask again which key is active when that lookup expires.
            cipher = self.active = cipher._replace(expires=min(expires, checked_until))
        return cipher

    def for_reading(self, value: bytes) -> Cipher:
        """The cipher that opens ``value``; DecryptionError if it is not one of ours."""
        stale = None
        if type(value) is bytes:
            cipher = self.ciphers.get(value[: wire.HEADER_BYTES])
            if cipher is not None and cipher.expires > clock():
                return cipher
            stale = cipher
        keys = self.envelope._keys()
        if (
            stale is not None
            and self._statement_began < stale.expires > clock() - self.envelope.keyring_refresh
            and not keys.can_load()
        ):
            # A row of a plain AsyncConnection.execute(), read after its statement (which
            # can load no key): its key was fresh when the statement began, and expired
            # less than keyring_refresh ago (the staleness allowed for keyring changes).
            return stale
        parsed = wire.parse_header(value)
        if parsed is None:
            raise DecryptionError(
                f"{self.where()}: the stored value is not a valid encrypted value"
            )
        algorithm, key_id = parsed
        try:
            expires, key = keys.data_key(key_id, self.scope)
        except KeyOfAnotherScope:
            error: EnvelopeError = self._unauthentic(key_id)  # as it would be with I/O
        except KeyNotFoundError as exc:  # also KeyDestroyedError: same type, naming the column
            error = type(exc)(f"{self.where()}: {exc}")
        else:
            return self._cipher(algorithm, key, expires)
        raise error

    def for_lookup(self) -> list[Cipher]:
        """Deterministic ciphers under every readable key of the scope."""
        return self._readable()[1]

    def _readable(self) -> tuple[float, list[Cipher]]:
        """``(listed_until, ciphers)`` under every readable key of the scope."""
        listed_until, keys = self.envelope._keys().readable_keys(self.scope)
        return listed_until, [self._cipher(self.algorithm, key, expires) for expires, key in keys]

    # -- bytes in, bytes out ---------------------------------------------------------
    def encrypt(self, plaintext: bytes) -> bytes:
        cipher = self.for_writing()
        return cipher.head + cipher.seal(plaintext)

    def decrypt(self, value: bytes) -> bytes:
        cipher = self.for_reading(value)
        try:
            return cipher.open(value)
        except AuthenticationFailed:
            pass
        raise self._unauthentic(cipher.key_id)

    def _unauthentic(self, key_id: int) -> DecryptionError:
        return DecryptionError(
            f"{self.where(key_id)}: the stored value did not authenticate "
            "(tampered, truncated, moved from another column, or foreign)"
        )

    def forget(self, key_id: int | None, scope: str | None) -> None:
        """Drop derived ciphers after a key changed (destroyed, rotated, re-wrapped)."""
        if scope is None or scope == self.scope:
            self.active = None
            self._warm_until = 0.0
        if key_id is None and scope is None:
            self.ciphers.clear()
        elif key_id is not None:
            for head in [h for h, c in self.ciphers.items() if c.key_id == key_id]:
                self.ciphers.pop(head, None)

    def prefetch(self) -> None:
        """Load every readable key of the scope (used under asyncio, see ``events``)."""
        self._statement_began = now = clock()
        if self._warm_until > now:
            return
        listed_until, ciphers = self._readable()
        # Until a key expires, or the listing does: a key rotated in another process
        # is then loaded by the next statement.
        self._warm_until = min([listed_until, *(c.expires for c in ciphers)])
