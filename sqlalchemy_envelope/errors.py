"""The error hierarchy: one root, one class per thing a caller can act on.

Messages name the table, column and key id where known; they never carry
plaintext, ciphertext or key material.
"""

from __future__ import annotations


class EnvelopeError(Exception):
    """Root of every error this library raises."""


class ConfigurationError(EnvelopeError):
    """The envelope, a column or a provider is missing a setting or is misused."""


class KmsError(EnvelopeError):
    """The KMS refused a request or could not be reached.

    ``code`` holds the provider's error code (for AWS, e.g. ``AccessDeniedException``)
    when there is one.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class DecryptionError(EnvelopeError):
    """A stored value did not authenticate: tampered, truncated, moved or foreign.

    Deliberately one class for every cause, so that the error tells an attacker
    nothing about which check failed.
    """


class KeyNotFoundError(EnvelopeError):
    """A value or an operation names a data key that the keyring does not hold."""


class KeyDestroyedError(KeyNotFoundError):
    """The data key was crypto-shredded; values under it are gone for good."""


class KeyInUseError(EnvelopeError):
    """A data key cannot be destroyed while values still use it (pass ``force=True``)."""


class EncryptedComparisonError(EnvelopeError):
    """A SQL comparison was asked of an encrypted column that cannot answer it."""


class ValueTypeError(EnvelopeError, TypeError):
    """A Python value of the wrong type was bound to an encrypted column."""


class RotationConflictError(EnvelopeError):
    """Concurrent rotations of one scope kept conflicting with this one through every retry.

    Nothing changed (the scope keeps the key that is active now): rotate again.
    """


class RewrapError(EnvelopeError):
    """A re-wrap left data keys under another KMS key; those it moved stay moved.

    ``moved`` counts the keys it moved, ``failed`` lists ``(key_id, scope, code)``
    for each key the KMS would not move (``code`` is the provider's error code, or
    None), ``remaining`` counts keys created while it ran that are still elsewhere.
    The envelope keeps its KMS: run the re-wrap again once the cause is dealt with.
    """

    def __init__(
        self,
        message: str,
        *,
        moved: int,
        failed: tuple[tuple[int, str, str | None], ...],
        remaining: int,
    ) -> None:
        super().__init__(message)
        self.moved = moved
        self.failed = failed
        self.remaining = remaining


class TableBusyError(EnvelopeError):
    """A job's schema change could not lock its table without stalling the application.

    Another transaction kept the table through every try (each waits briefly,
    so the application's queries never queue behind it for long). The job
    keeps its progress: end or wait out that transaction, then run it again.
    """


def where(table: str | None, column: str | None, key_id: int | None = None) -> str:
    """The location part of a message: ``patients.ssn (key 3)``."""
    text = f"{table or '?'}.{column or '?'}"
    return text if key_id is None else f"{text} (key {key_id})"
