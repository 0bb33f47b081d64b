"""Transparent field-level envelope encryption for SQLAlchemy 2.x.

envelope = Envelope(Base.metadata)
class Patient(Base):
    ...
    ssn: Mapped[str | None] = mapped_column(Encrypted(sa.String(11), envelope))
envelope.configure(kms=AwsKms("alias/app-pii"), engine=engine)
"""

from __future__ import annotations

from .cache import Stats
from .column import Encrypted
from .envelope import Envelope
from .errors import (
    ConfigurationError,
    DecryptionError,
    EncryptedComparisonError,
    EnvelopeError,
    KeyDestroyedError,
    KeyInUseError,
    KeyNotFoundError,
    KmsError,
    RewrapError,
    RotationConflictError,
    TableBusyError,
    ValueTypeError,
)
from .kms import AwsKms, KeyProvider, LocalKms
from .lifecycle import KeyInfo

__version__ = "0.1.0"

__all__ = [
    "AwsKms",
    "ConfigurationError",
    "DecryptionError",
    "Encrypted",
    "EncryptedComparisonError",
    "Envelope",
    "EnvelopeError",
    "KeyDestroyedError",
    "KeyInUseError",
    "KeyInfo",
    "KeyNotFoundError",
    "KeyProvider",
    "KmsError",
    "LocalKms",
    "RewrapError",
    "RotationConflictError",
    "Stats",
    "TableBusyError",
    "ValueTypeError",
]
