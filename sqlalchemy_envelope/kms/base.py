"""The small protocol every KMS provider implements.

A provider wraps and unwraps 32-byte data keys under a customer master key
(CMK). Every call carries an *encryption context* (``{"sqlalchemy-envelope:scope":
scope}``) that the wrapping authenticates, so a wrapped key moved to another
scope does not unwrap, and the KMS audit log shows which scope was read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

DATA_KEY_BYTES = 32
SCOPE_CONTEXT_KEY = "sqlalchemy-envelope:scope"


def scope_context(scope: str) -> dict[str, str]:
    """The encryption context that binds a wrapped data key to its scope."""
    return {SCOPE_CONTEXT_KEY: scope}


@dataclass(frozen=True, repr=False)
class GeneratedKey:
    """A fresh data key: the plaintext (kept in memory only) and its wrapped form."""

    plaintext: bytes
    wrapped: bytes
    kms_key_id: str

    def __repr__(self) -> str:
        return f"GeneratedKey(kms_key_id={self.kms_key_id!r}, plaintext=<redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError("a generated data key holds its plaintext and cannot be pickled")


@runtime_checkable
class KeyProvider(Protocol):
    """What the envelope needs from a KMS.

    ``kms_key_id`` values are what the keyring stores in its ``kms_key_id``
    column: for AWS the CMK's ARN, for the local provider a fingerprint.
    Every method raises :class:`~sqlalchemy_envelope.KmsError` when the KMS
    refuses or cannot be reached.
    """

    def generate_data_key(self, context: Mapping[str, str]) -> GeneratedKey:
        """A new random data key, wrapped under this provider's CMK."""
        ...

    def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> tuple[bytes, str]:
        """Wrap an existing data key under this provider's CMK: ``(wrapped, kms_key_id)``."""
        ...

    def unwrap(self, wrapped: bytes, context: Mapping[str, str], kms_key_id: str) -> bytes:
        """The plaintext data key of ``wrapped`` (stored with ``kms_key_id``)."""
        ...

    def rewrap_from(
        self, source: KeyProvider, wrapped: bytes, context: Mapping[str, str], kms_key_id: str
    ) -> tuple[bytes, str]:
        """Move ``wrapped`` (from ``source``) under this provider's CMK.

        Providers that can do it server-side (AWS ``ReEncrypt``) do; others
        unwrap with ``source`` and wrap again.
        """
        ...

    def owns(self, kms_key_id: str) -> bool:
        """Whether a key stored with ``kms_key_id`` is already under this provider's CMK."""
        ...
