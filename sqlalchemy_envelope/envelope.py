"""``Envelope``: one per application; holds the keyring table, the KMS and the key cache."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import events, lifecycle
from .cache import Stats
from .errors import ConfigurationError
from .keyring import Keyring, in_memory, keyring_table, sync_engine
from .keys import KeyManager
from .kms.base import KeyProvider

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .crypter import ColumnCrypter
    from .lifecycle import KeyInfo

METADATA_KEY = "sqlalchemy_envelope"


class Envelope:
    """Envelope encryption for one application's encrypted columns.

    ``Envelope(Base.metadata)`` adds the keyring table to the metadata, so
    ``create_all`` and Alembic autogenerate see it. ``configure(kms=..., engine=...)``
    supplies the KMS and the engine the keyring lives on; it may come after the
    models are declared. ``cache_ttl`` bounds how long an unwrapped data key is
    used from memory before the KMS is asked again; ``cache_capacity`` how many
    keys are held; ``keyring_refresh`` how often a scope's active key is
    re-read from the keyring (so rotations elsewhere take effect).
    """

    def __init__(
        self,
        metadata: sa.MetaData | None = None,
        *,
        table_name: str = "envelope_data_keys",
        cache_ttl: float = 300.0,
        cache_capacity: int = 1000,
        keyring_refresh: float = 1.0,
    ) -> None:
        if metadata is not None and not isinstance(metadata, sa.MetaData):
            raise TypeError(
                f"metadata must be a sqlalchemy MetaData, not {type(metadata).__name__}"
            )
        if not isinstance(table_name, str) or not table_name:
            raise ValueError("table_name must be a non-empty string")
        for name, value in (("cache_ttl", cache_ttl), ("keyring_refresh", keyring_refresh)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < float("inf")
            ):
                raise ValueError(f"{name} must be a positive, finite number of seconds")
        if (
            isinstance(cache_capacity, bool)
            or not isinstance(cache_capacity, int)
            or cache_capacity < 1
        ):
            raise ValueError("cache_capacity must be a positive integer")
        if metadata is not None and METADATA_KEY in metadata.info:
            raise ConfigurationError(
                "this MetaData already has an Envelope; create one per application"
            )
        self.metadata = metadata
        self.table = keyring_table(metadata if metadata is not None else sa.MetaData(), table_name)
        if metadata is not None:
            metadata.info[METADATA_KEY] = self
        self.cache_ttl = float(cache_ttl)
        self.cache_capacity = cache_capacity
        self.keyring_refresh = float(keyring_refresh)
        self.stats = Stats()
        self._manager: KeyManager | None = None
        self._keyring: Keyring | None = None
        self._crypters: weakref.WeakSet[ColumnCrypter] = weakref.WeakSet()
        #: ``(table, column) -> scope`` of every column declared with this envelope.
        self.columns: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        events.install()

    def __repr__(self) -> str:
        kms = self._manager.kms if self._manager is not None else None
        return f"Envelope(table_name={self.table.name!r}, kms={kms!r}, cache_ttl={self.cache_ttl})"

    def __reduce__(self) -> Any:
        raise TypeError("an Envelope holds unwrapped keys and cannot be pickled")

    # -- configuration ---------------------------------------------------------------
    def configure(self, *, kms: KeyProvider | None, engine: Engine | AsyncEngine) -> None:
        """Set the KMS and the engine the keyring table lives on (sync or asyncio)."""
        if kms is not None and not isinstance(kms, KeyProvider):
            raise TypeError(
                f"kms must be a KMS provider such as AwsKms or LocalKms, not {type(kms).__name__}"
            )
        sync_engine(engine)  # TypeError for anything else
        with self._lock:
            if self._keyring is not None:
                self._keyring.dispose()
            if self._manager is not None:
                events.unwatch_sqlite(self._manager)
            self._keyring = Keyring(self.table, engine)
            self._manager = (
                None
                if kms is None
                else KeyManager(
                    self._keyring,
                    kms,
                    ttl=self.cache_ttl,
                    capacity=self.cache_capacity,
                    # Nothing outside this process can rotate an in-memory database's keys.
                    refresh=float("inf")
                    if in_memory(self._keyring.data_engine)
                    else self.keyring_refresh,
                    stats=self.stats,
                    known_scopes=lambda: set(self.columns.values()),
                )
            )
            if self._manager is not None:
                events.watch_sqlite(self._manager)
            for crypter in list(self._crypters):
                crypter.forget(None, None)

    @property
    def kms(self) -> KeyProvider:
        return self._keys().kms

    @property
    def engine(self) -> Engine:
        """The application's engine (its synchronous facade under asyncio)."""
        return self.keyring().data_engine

    def dispose(self) -> None:
        """Close the connections the keyring opened (it keeps a small pool of its own)."""
        if self._keyring is not None:
            self._keyring.dispose()

    def keyring(self) -> Keyring:
        if self._keyring is None:
            raise ConfigurationError(
                "the envelope is not configured: call envelope.configure(kms=..., engine=...) first"
            )
        return self._keyring

    def _keys(self) -> KeyManager:
        manager = self._manager
        if manager is None:
            self.keyring()
            raise ConfigurationError(
                "the envelope has no KMS: call envelope.configure(kms=..., engine=...)"
            )
        return manager

    def _subscribe(self, crypter: ColumnCrypter) -> None:
        self._crypters.add(crypter)

    def _forget(self, *, key_id: int | None = None, scope: str | None = None) -> None:
        if self._manager is not None:
            self._manager.forget(key_id=key_id, scope=scope)
        for crypter in list(self._crypters):
            crypter.forget(key_id, scope)

    # -- key lifecycle ---------------------------------------------------------------
    def rotate(self, scope: str) -> int:
        """A new active data key for ``scope``; older keys stay readable. Returns its id.

        The first key of a scope that no column of this envelope uses is logged
        as a warning (a mistyped scope leaves the intended one on its old key).
        """
        return lifecycle.rotate(self, scope)

    def rewrap(
        self, kms: KeyProvider, *, progress: Callable[[int, int | None], None] | None = None
    ) -> int:
        """Re-wrap every stored data key under ``kms``; afterwards the envelope uses it."""
        return lifecycle.rewrap(self, kms, progress=progress)

    def destroy(self, key_id: int, *, force: bool = False) -> None:
        """Crypto-shred a data key; refuses while values use it unless ``force=True``."""
        lifecycle.destroy(self, key_id, force=force)

    def keys(self, scope: str | None = None) -> list[KeyInfo]:
        """The keyring's entries (never key material), oldest first."""
        return lifecycle.keys(self, scope)

    def reencrypt(
        self,
        table_or_model: Any,
        *,
        batch_size: int = 1000,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Any:
        """Move every value of the table's encrypted columns to its scope's active key."""
        from .jobs import reencrypt

        return reencrypt(self, table_or_model, batch_size=batch_size, progress=progress)

    def verify(self, table_or_model: Any) -> Any:
        """Count values per key, plaintext and unreadable values; never shows a value."""
        from .jobs import verify

        return verify(self, table_or_model)
