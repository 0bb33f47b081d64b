"""A KMS in process: data keys wrapped under a local 32-byte master key.

For development, tests and the demo. The master key never leaves this object:
``repr`` shows a fingerprint, pickling is refused, and the key id stored in the
keyring is that fingerprint (``local:`` + 16 hex digits), derived with HKDF so
it reveals nothing about the key.

Wrapped format: ``version (1 byte) || nonce (12) || ciphertext (32) || tag (16)``,
AES-256-GCM under a wrapping key derived from the master key, with the
encryption context (canonical JSON) as associated data.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from typing import Final, NoReturn

from .. import _crypto
from ..errors import ConfigurationError, KmsError
from .base import DATA_KEY_BYTES, GeneratedKey, KeyProvider

ENV_VAR: Final = "SQLALCHEMY_ENVELOPE_MASTER_KEY"
KEY_ID_PREFIX: Final = "local:"
VERSION: Final = 1

_WRAP_INFO: Final = b"sqlalchemy-envelope/local-kms/wrap/v1"
_FINGERPRINT_INFO: Final = b"sqlalchemy-envelope/local-kms/fingerprint/v1"
_AAD_LABEL: Final = b"sqlalchemy-envelope/local-kms/v1\x00"
_GENERATE_HINT: Final = (
    "generate one with: sqlalchemy-envelope keys generate-master-key PATH "
    '(or python -c "import base64,os;print(base64.b64encode(os.urandom(32)).decode())")'
)
# How long a losing ``from_file(create=True)`` waits for the winner to finish writing.
_CREATE_RACE_WAIT: Final = 2.0


class LocalKms:
    """Wraps data keys with AES-256-GCM under a master key held in memory."""

    __slots__ = ("_aead", "_kms_key_id")

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, bytes):
            raise TypeError(
                "master_key must be bytes (32 raw bytes); to load a base64 key use "
                "LocalKms.from_env() or LocalKms.from_file()"
            )
        if len(master_key) != DATA_KEY_BYTES:
            raise ValueError(
                f"master_key must be exactly {DATA_KEY_BYTES} bytes, not {len(master_key)}"
            )
        # Only derived keys are kept: the wrapping key and a public fingerprint.
        self._aead = _crypto.RandomizedAead(_crypto.derive_key(master_key, _WRAP_INFO, 32))
        fingerprint = _crypto.derive_key(master_key, _FINGERPRINT_INFO, 8).hex()
        self._kms_key_id = KEY_ID_PREFIX + fingerprint

    # -- construction -------------------------------------------------------------

    @staticmethod
    def generate_key() -> str:
        """A new random master key, as standard base64 (44 characters)."""
        return base64.b64encode(_crypto.random_bytes(DATA_KEY_BYTES)).decode("ascii")

    @classmethod
    def from_env(cls, var: str = ENV_VAR) -> LocalKms:
        """The master key from environment variable ``var`` (base64, or 64 hex digits)."""
        value = os.environ.get(var, "").strip()
        if not value:
            raise ConfigurationError(f"environment variable {var} is not set; {_GENERATE_HINT}")
        return cls(_decode_key(value, f"environment variable {var}"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], create: bool = False) -> LocalKms:
        """The master key from a file holding it in base64.

        With ``create=True`` a missing file is created with a new random key
        (mode 0600); an existing file is read, never overwritten.
        """
        path = os.fspath(path)
        if create and not _create_key_file(path):
            _wait_for_content(path)
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            raise ConfigurationError(
                f"key file {path} does not exist; create it with "
                f"LocalKms.from_file(path, create=True), or {_GENERATE_HINT}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            # Only the error class and errno text: the content is never echoed.
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise ConfigurationError(f"cannot read key file {path}: {reason}") from None
        return cls(_decode_key(text, f"key file {path}"))

    # -- KeyProvider ----------------------------------------------------------------

    @property
    def kms_key_id(self) -> str:
        """``local:`` + a 16-hex-digit fingerprint of the master key."""
        return self._kms_key_id

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        plaintext = _crypto.random_bytes(DATA_KEY_BYTES)
        wrapped, kms_key_id = self.wrap(plaintext, context)
        return GeneratedKey(plaintext=plaintext, wrapped=wrapped, kms_key_id=kms_key_id)

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        _check_data_key(plaintext)
        sealed = self._aead.seal(plaintext, _aad(context))
        return bytes((VERSION,)) + sealed, self._kms_key_id

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        if not self.owns(kms_key_id):
            raise KmsError(
                f"local KMS could not unwrap the data key: it was wrapped under "
                f"{kms_key_id!r}, not this master key ({self._kms_key_id})",
                code="IncorrectKeyException",
            )
        if not wrapped or wrapped[0] != VERSION:
            self._unwrap_failed()
        try:
            plaintext = self._aead.open(wrapped, _aad(context), offset=1)
        except _crypto.AuthenticationFailed:
            self._unwrap_failed()
        if len(plaintext) != DATA_KEY_BYTES:
            self._unwrap_failed()
        return plaintext

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        return self.wrap(source.unwrap(wrapped, context, kms_key_id), context)

    def owns(self, kms_key_id: str) -> bool:
        return kms_key_id == self._kms_key_id

    # -- keeping the key in -----------------------------------------------------------

    def __repr__(self) -> str:
        return f"LocalKms({self._kms_key_id})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("LocalKms holds a master key and cannot be pickled")

    def __copy__(self) -> LocalKms:
        return self  # immutable; copying would only duplicate key material

    def __deepcopy__(self, memo: object) -> LocalKms:
        return self

    def _unwrap_failed(self) -> NoReturn:
        # One message for every cause: the caller cannot act on which check failed.
        raise KmsError(
            f"local KMS could not unwrap the data key: wrong master key "
            f"(fingerprint {self._kms_key_id}) or wrong scope, or the wrapped key is corrupted",
            code="InvalidCiphertextException",
        )


def _aad(context: Mapping[str, str]) -> bytes:
    # Canonical JSON, so equal contexts authenticate equally whatever their order.
    canonical = json.dumps(dict(context), sort_keys=True, separators=(",", ":"))
    return _AAD_LABEL + canonical.encode("ascii")


def _check_data_key(plaintext: bytes) -> None:
    if not isinstance(plaintext, bytes):
        raise TypeError("a data key must be bytes")
    if len(plaintext) != DATA_KEY_BYTES:
        raise ValueError(f"a data key must be exactly {DATA_KEY_BYTES} bytes")


def _decode_key(text: str, source: str) -> bytes:
    """32 key bytes from base64 or hex; errors name ``source``, never the value."""
    key: bytes | None = None
    if len(text) == 2 * DATA_KEY_BYTES:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = None
    if key is None:
        try:
            key = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            key = None
    if key is None or len(key) != DATA_KEY_BYTES:
        raise ConfigurationError(
            f"{source} does not hold a valid master key: expected {DATA_KEY_BYTES} bytes as "
            f"standard base64 (44 characters) or hex (64 characters); {_GENERATE_HINT}"
        )
    return key


def _create_key_file(path: str) -> bool:
    """Write a new key to ``path`` unless it exists; True when this call created it."""
    try:
        # O_EXCL: of two racing creators exactly one wins; nothing is ever overwritten.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigurationError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(LocalKms.generate_key() + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        # A half-written key file would be read as a bad key forever after.
        os.unlink(path)
        raise ConfigurationError(f"cannot write key file {path}: {exc.strerror}") from None
    return True


def _wait_for_content(path: str) -> None:
    """Give a concurrent creator time to finish writing the file it just created."""
    deadline = time.monotonic() + _CREATE_RACE_WAIT
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(path) > 0:
                return
        except FileNotFoundError:
            return  # the creator failed and removed it; the read reports that
        time.sleep(0.01)
