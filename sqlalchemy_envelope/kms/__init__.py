"""KMS providers: AWS KMS (production) and a local master key (development)."""

from __future__ import annotations

from .aws import AwsKms
from .base import DATA_KEY_BYTES, GeneratedKey, KeyProvider, scope_context
from .local import LocalKms

__all__ = ["DATA_KEY_BYTES", "AwsKms", "GeneratedKey", "KeyProvider", "LocalKms", "scope_context"]
