"""Data keys: created, found and unwrapped through the KMS, served from the cache.

KMS calls scale with keys, never with rows: a key is unwrapped once per
process per ``cache_ttl``, and concurrent first uses of one key or one scope
coalesce into one call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _runtime
from .cache import Cache, Stats
from .errors import ConfigurationError, KeyDestroyedError, KeyNotFoundError, KmsError
from .keyring import ACTIVE, DESTROYED, RETIRED, Keyring, KeyRow
from .kms.base import DATA_KEY_BYTES, KeyProvider, scope_context

log = logging.getLogger("sqlalchemy_envelope")

T = TypeVar("T")


@dataclass(frozen=True, repr=False)
class DataKey:
    """An unwrapped data key. Lives in memory only; never printed, never pickled."""

    id: int
    scope: str
    material: bytes = field(compare=False)

    def __repr__(self) -> str:
        return f"DataKey(id={self.id}, scope={self.scope!r}, material=<redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError("data keys cannot be pickled")


class KeyManager:
    """Finds, creates and unwraps data keys for one envelope.

    Two caches: unwrapped keys live for ``cache_ttl``; which key is a scope's
    active one, and which keys a scope has, is re-read from the keyring every
    ``refresh`` seconds, so a rotation or a shredding in another process takes
    effect here within that time without another KMS call.
    """

    def __init__(
        self,
        keyring: Keyring,
        kms: KeyProvider,
        *,
        ttl: float,
        capacity: int,
        refresh: float,
        stats: Stats,
        known_scopes: Callable[[], set[str]] = set,
    ) -> None:
        self.keyring = keyring
        self.known_scopes = known_scopes
        self._prepared: set[str] = set()
        self.kms = kms
        self.stats = stats
        self.cache: Cache[DataKey] = Cache(ttl=ttl, capacity=capacity, stats=stats)
        self.meta: Cache[Any] = Cache(ttl=min(ttl, refresh), capacity=capacity, stats=Stats())
        #: Ids of destroyed keys seen in a scope's listing: known without I/O (asyncio rows).
        self.destroyed: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"KeyManager({self.keyring!r}, kms={self.kms!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a key manager cannot be pickled")

    # -- KMS -------------------------------------------------------------------------
    def call_kms(self, fn: Callable[..., T], *args: Any) -> T:
        """One counted KMS call, off the event loop under asyncio."""
        self.stats.add("kms_calls")
        try:
            return _runtime.offload(fn, *args)
        except KmsError:
            raise
        except Exception as exc:  # a provider that broke its contract
            raise KmsError(f"the KMS call failed: {type(exc).__name__}") from None

    def _unwrap(self, row: KeyRow) -> DataKey:
        if row.state == DESTROYED or row.wrapped_key is None:
            raise _destroyed(row.id, row.scope)
        try:
            material = self.call_kms(
                self.kms.unwrap, row.wrapped_key, scope_context(row.scope), row.kms_key_id
            )
        except KmsError as exc:
            # Name the key and scope: the provider only knows the CMK.
            raise KmsError(
                f"data key {row.id} of scope {row.scope!r} could not be unwrapped: {exc}",
                code=exc.code,
            ) from exc
        if len(material) != DATA_KEY_BYTES:
            raise KmsError(f"the KMS returned a data key of the wrong size for key {row.id}")
        return DataKey(row.id, row.scope, material)

    # -- lookups ---------------------------------------------------------------------
    def data_key(self, key_id: int) -> tuple[float, DataKey]:
        """``(expires_at, key)`` for a key id found in a stored value."""

        def load() -> DataKey:
            if self.keyring.engine.dialect.is_async and not _runtime.in_greenlet():
                # A row of a plain AsyncConnection.execute() is processed after its
                # statement's greenlet ended: no I/O is possible. The keys the scope
                # can read were loaded before the statement ran (events._prefetch_for_async).
                if key_id in self.destroyed:
                    raise _destroyed(key_id, self.destroyed[key_id])
                raise KeyNotFoundError(
                    f"data key {key_id} is not a readable key of the column's scope"
                )
            row = self.keyring.get(key_id)
            if row is None:
                raise KeyNotFoundError(f"data key {key_id} is not in the keyring")
            return self._unwrap(row)

        return self.cache.get_or_load(key_id, load)

    def active_key(self, scope: str) -> tuple[float, float, DataKey]:
        """``(expires_at, checked_until, key)``: the scope's active key, created once if missing.

        ``checked_until`` is when to ask the keyring again which key is active.
        """

        def load() -> int:
            row = self.keyring.active(scope)
            if row is None:
                return self._create(scope)
            self.cache.get_or_load(row.id, lambda: self._unwrap(row))
            return row.id

        checked_until, key_id = self.meta.get_or_load(("active", scope), load)
        expires, key = self.data_key(key_id)
        return expires, checked_until, key

    def readable_keys(self, scope: str) -> list[tuple[float, DataKey]]:
        """Every key of the scope that can still decrypt (for deterministic lookups)."""
        _, ids = self.meta.get_or_load(("scope", scope), lambda: self._readable_ids(scope))
        keys = []
        for key_id in ids:
            try:
                keys.append(self.data_key(key_id))
            except KeyNotFoundError:
                continue  # shredded since the list was read
        return keys

    def _readable_ids(self, scope: str) -> tuple[int, ...]:
        rows = self.keyring.rows(scope)
        self.destroyed.update((r.id, r.scope) for r in rows if r.state == DESTROYED)
        return tuple(r.id for r in rows if r.state in (ACTIVE, RETIRED))

    def prepare_scopes(self) -> None:
        """Create the first key of every declared scope that never had one (see ``events``)."""
        missing = self.known_scopes() - self._prepared
        if not missing:
            return
        existing = {r.scope for r in self.keyring.rows()}
        for scope in sorted(missing - existing):
            self.active_key(scope)
        self._prepared |= missing

    def _create(self, scope: str) -> int:
        generated = self.call_kms(self.kms.generate_data_key, scope_context(scope))
        row = self.keyring.insert_active(scope, generated.wrapped, generated.kms_key_id)
        if row is None:  # another process created the scope's key first: use theirs
            row = self.keyring.active(scope)
            if row is None:
                raise ConfigurationError(f"could not create or find an active key for {scope!r}")
            self.cache.get_or_load(row.id, lambda: self._unwrap(row))
            return row.id
        self.stats.add("keys_created")
        log.info("created data key %d for scope %r (kms key %s)", row.id, scope, row.kms_key_id)
        self.cache.put(row.id, DataKey(row.id, scope, generated.plaintext))
        self.meta.discard(lambda entry: entry == ("scope", scope))
        return row.id

    # -- invalidation ----------------------------------------------------------------
    def forget(self, *, key_id: int | None = None, scope: str | None = None) -> None:
        """Drop what memory holds about a key or a scope (after destroy, rotate, rewrap)."""

        if key_id is not None:
            self.cache.discard(lambda entry: entry == key_id)
        self.meta.discard(lambda entry: scope is None or entry[1] == scope)  # type: ignore[index]


def _destroyed(key_id: int, scope: str) -> KeyDestroyedError:
    return KeyDestroyedError(
        f"data key {key_id} of scope {scope!r} was destroyed; "
        "values under it cannot be read any more"
    )
