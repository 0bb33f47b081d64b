"""The cipher boundary: the only module that imports ``cryptography.hazmat``.

Everything above it sees three things: a randomized AEAD (AES-256-GCM with
random 96-bit nonces), a deterministic AEAD (AES-SIV, RFC 5297), and HKDF to
derive per-column sub-keys from a data key. Authentication failures surface as
:class:`AuthenticationFailed`, which callers turn into their own error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
SIV_BYTES: Final = 16
KEY_BYTES: Final = 32
SIV_KEY_BYTES: Final = 64  # AES-SIV with AES-256 for both of its halves

random_bytes = os.urandom


class AuthenticationFailed(Exception):
    """The AEAD tag did not verify (or the input was not a well-formed ciphertext)."""


def derive_key(key: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 with an empty salt: a sub-key of ``key`` bound to ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


class RandomizedAead:
    """AES-256-GCM; ``seal`` returns ``nonce || ciphertext || tag``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "RandomizedAead(<key redacted>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = random_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes, offset: int = 0) -> bytes:
        """Open ``sealed[offset:]``."""
        if len(sealed) - offset < NONCE_BYTES + TAG_BYTES:
            raise AuthenticationFailed
        nonce_end = offset + NONCE_BYTES
        try:
            return self._aead.decrypt(sealed[offset:nonce_end], sealed[nonce_end:], aad)
        except InvalidTag:
            raise AuthenticationFailed from None


Seal = Callable[[bytes], bytes]
Open = Callable[[bytes], bytes]
SealAll = Callable[[bytes, Sequence[bytes]], list[bytes]]


def column_cipher(
    deterministic: bool, data_key: bytes, info: bytes, aad: bytes, offset: int
) -> tuple[Seal, Open, SealAll]:
    """``(seal, open, seal_all)`` closures for one column under one data key.

    The sub-key is derived from ``data_key`` with HKDF under ``info``. ``seal``
    returns the sealed body (the caller prepends the header); ``open`` takes
    the whole stored value and reads the body from ``offset``. All bind
    ``aad``. Built once per key and column, so the per-value path is one call.

    ``seal_all(head, plaintexts)`` is ``[head + seal(p) for p in plaintexts]``
    for a batch job: it draws every nonce in one ``os.urandom`` call (a system
    call, a third of the cost of sealing a short value, and a point where the
    thread lets go of the GIL). The nonces live only in that call, so there
    is no pool of them that a ``fork()`` could copy into two processes.
    """
    if deterministic:
        siv = AESSIV(derive_key(data_key, info, SIV_KEY_BYTES))
        siv_encrypt, siv_decrypt, aad_list = siv.encrypt, siv.decrypt, [aad]

        def seal_siv(plaintext: bytes) -> bytes:
            return siv_encrypt(plaintext, aad_list)

        def open_siv(value: bytes) -> bytes:
            try:
                return siv_decrypt(value[offset:], aad_list)
            except (InvalidTag, ValueError):
                raise AuthenticationFailed from None

        def seal_all_siv(head: bytes, plaintexts: Sequence[bytes]) -> list[bytes]:
            return [head + siv_encrypt(p, aad_list) for p in plaintexts]

        return seal_siv, open_siv, seal_all_siv

    gcm = AESGCM(derive_key(data_key, info, KEY_BYTES))
    encrypt, decrypt, urandom = gcm.encrypt, gcm.decrypt, random_bytes
    body = offset + NONCE_BYTES

    def seal_gcm(plaintext: bytes) -> bytes:
        nonce = urandom(NONCE_BYTES)
        return nonce + encrypt(nonce, plaintext, aad)

    def open_gcm(value: bytes) -> bytes:
        # No length check: a value cut short leaves a nonce under 8 bytes
        # (ValueError) or no room for the tag (InvalidTag), so it fails below.
        try:
            return decrypt(value[offset:body], value[body:], aad)
        except (InvalidTag, ValueError):
            raise AuthenticationFailed from None

    def seal_all_gcm(head: bytes, plaintexts: Sequence[bytes]) -> list[bytes]:
        nonces = urandom(NONCE_BYTES * len(plaintexts))
        each = [nonces[i : i + NONCE_BYTES] for i in range(0, len(nonces), NONCE_BYTES)]
        return [head + n + encrypt(n, p, aad) for n, p in zip(each, plaintexts, strict=True)]

    return seal_gcm, open_gcm, seal_all_gcm


def gcm_seal_with_nonce(
    data_key: bytes, info: bytes, aad: bytes, nonce: bytes, plaintext: bytes
) -> bytes:
    """Randomized sealing with a chosen nonce: for known-answer test vectors only."""
    return nonce + AESGCM(derive_key(data_key, info, KEY_BYTES)).encrypt(nonce, plaintext, aad)
