"""Data keys: created, found and unwrapped through the KMS, served from the cache.

KMS calls scale with keys, never with rows: a key is unwrapped once per
process per ``cache_ttl``, and concurrent first uses of one key or one scope
coalesce into one call.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _runtime
from .cache import Cache, Stats
from .errors import ConfigurationError, KeyDestroyedError, KeyNotFoundError, KmsError
from .keyring import ACTIVE, DESTROYED, RETIRED, Keyring, KeyRow
from .kms.base import DATA_KEY_BYTES, GeneratedKey, KeyProvider, scope_context

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
        #: Scope of every key seen in a listing, and which of them are destroyed:
        #: known without I/O (rows of a plain AsyncConnection.execute, see data_key).
        self.owners: dict[int, str] = {}
        self.destroyed: set[int] = set()
        #: Under asyncio one listing of the whole keyring serves every scope, so a
        #: value naming any scope's key is told apart without I/O.
        self._list_all = keyring.engine.dialect.is_async
        #: Numbers key changes (created, forgotten): a listing read across one is stale.
        self._numbering = itertools.count(1)
        self._changes = 0

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

    def generate(self, scope: str) -> GeneratedKey:
        """A new data key for ``scope``, refused before anything stores it if another
        process could not use it (every process expects DATA_KEY_BYTES)."""
        generated = self.call_kms(self.kms.generate_data_key, scope_context(scope))
        if len(generated.plaintext) != DATA_KEY_BYTES:
            raise KmsError(
                f"the KMS generated a data key of the wrong size for scope {scope!r} "
                f"({len(generated.plaintext)} bytes, not {DATA_KEY_BYTES}); nothing was "
                "written: fix the KMS provider's generate_data_key"
            )
        return generated

    # -- lookups ---------------------------------------------------------------------
    def data_key(self, key_id: int, scope: str | None = None) -> tuple[float, DataKey]:
        """``(expires_at, key)`` for a key id found in a stored value of ``scope``.

        Raises :class:`KeyOfAnotherScope` for a key unwrapped for another scope
        (a value moved from a table of another scope whose name is the same, in
        another schema, would authenticate under it).
        """

        def load() -> DataKey:
            if not self.can_load():
                return self._known_without_io(key_id, scope)
            row = self.keyring.get(key_id)
            if row is None:
                raise KeyNotFoundError(f"data key {key_id} is not in the keyring")
            return self._unwrap(row)

        try:
            expires, key = self.cache.get_or_load(key_id, load)
        except _runtime.WouldBlock:
            pass  # raised outside the handler: nothing to chain
        else:
            if scope is not None and key.scope != scope:
                raise KeyOfAnotherScope(f"data key {key_id} belongs to scope {key.scope!r}")
            return expires, key
        raise KeyNotFoundError(
            f"data key {key_id} is being loaded by another task while this row is read "
            "outside SQLAlchemy's greenlet; read it again, or through an AsyncSession"
        )

    def _load(self, row: KeyRow) -> None:
        """Hold ``row``'s key, unwrapped for the row's own scope. A key in memory that was
        unwrapped for another scope (the row relabelled since) is unwrapped again, for
        the row's scope: the KMS's context binding then refuses it, as in a new process."""
        _, key = self.cache.get_or_load(row.id, lambda: self._unwrap(row))
        if key.scope != row.scope:
            self.cache.discard(lambda entry: entry == row.id)
            self.cache.get_or_load(row.id, lambda: self._unwrap(row))

    def can_load(self) -> bool:
        """Whether a key can be loaded here: not for a row of a plain AsyncConnection.execute(),
        processed after its statement's greenlet ended, where no I/O is possible."""
        return not (self.keyring.engine.dialect.is_async and not _runtime.in_greenlet())

    def _known_without_io(self, key_id: int, scope: str | None) -> DataKey:
        """A row of a plain AsyncConnection.execute() is processed after its statement's
        greenlet ended: no I/O is possible. The keys its scope can read were loaded before
        the statement ran (``events._prefetch_for_async``); what else the listing says
        decides the error."""
        owner = self.owners.get(key_id)
        if key_id in self.destroyed:
            raise _destroyed(key_id, self.owners[key_id])
        if owner is not None and scope is not None and owner != scope:
            raise KeyOfAnotherScope(f"data key {key_id} belongs to scope {owner!r}")
        if owner is not None:
            raise KeyNotFoundError(
                f"data key {key_id} was not loaded before this row was read outside "
                "SQLAlchemy's greenlet (the key cache let it go); read it again"
            )
        raise KeyNotFoundError(
            f"data key {key_id} was not in the keyring when this process last read it "
            "(keyring_refresh); if another process rotated the key since, read again"
        )

    def active_key(self, scope: str) -> tuple[float, float, DataKey]:
        """``(expires_at, checked_until, key)``: the scope's active key, created once if missing.

        ``checked_until`` is when to ask the keyring again which key is active.
        """

        def load() -> int:
            row = self.keyring.active(scope)
            if row is None:
                return self._create(scope)
            self._load(row)
            return row.id

        checked_until, key_id = self.meta.get_or_load(("active", scope), load)
        # The keyring's CHECK keeps an active row's scope its own; should it not,
        # KeyOfAnotherScope refuses the write.
        expires, key = self.data_key(key_id, scope)
        return expires, checked_until, key

    def readable_keys(self, scope: str) -> tuple[float, list[tuple[float, DataKey]]]:
        """``(listed_until, keys)``: every key of the scope that can still decrypt (for
        deterministic lookups), and until when that listing is served from memory."""
        listed = None if self._list_all else scope
        entry = ("scope", listed)
        listed_until, (changes, rows) = self.meta.get_or_load(entry, lambda: self._listing(listed))
        if changes != self._changes:  # a key changed while it was read: read it again
            self.meta.discard(lambda e: e == entry)
            listed_until, (_, rows) = self.meta.get_or_load(entry, lambda: self._listing(listed))
        keys = []
        for row in rows:
            if row.scope != scope or row.state not in (ACTIVE, RETIRED):
                continue
            try:
                keys.append(self.data_key(row.id, scope))
            except KeyNotFoundError:
                continue  # shredded since the list was read
        return listed_until, keys

    def _listing(self, scope: str | None) -> tuple[int, tuple[KeyRow, ...]]:
        changes = self._changes
        rows = tuple(self.keyring.rows(scope))
        self.owners.update((r.id, r.scope) for r in rows)
        self.destroyed.update(r.id for r in rows if r.state == DESTROYED)
        return changes, rows

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
        generated = self.generate(scope)
        row = self.keyring.insert_active(scope, generated.wrapped, generated.kms_key_id)
        if row is None:  # another process created the scope's key first: use theirs
            row = self.keyring.active(scope)
            if row is None:
                raise ConfigurationError(f"could not create or find an active key for {scope!r}")
            self._load(row)
            return row.id
        self.stats.add("keys_created")
        log.info("created data key %d for scope %r (kms key %s)", row.id, scope, row.kms_key_id)
        self.cache.put(row.id, DataKey(row.id, scope, generated.plaintext))
        self._changes = next(self._numbering)
        self.meta.discard(lambda entry: entry in (("scope", scope), ("scope", None)))
        return row.id

    # -- invalidation ----------------------------------------------------------------
    def forget(self, *, key_id: int | None = None, scope: str | None = None) -> None:
        """Drop what memory holds about a key or a scope (after destroy, rotate, rewrap)."""

        self._changes = next(self._numbering)
        if key_id is not None:
            self.cache.discard(lambda entry: entry == key_id)
        self.meta.discard(lambda entry: scope is None or entry[1] in (scope, None))  # type: ignore[index]


class KeyOfAnotherScope(KeyNotFoundError):
    """A stored value names another scope's key (the column turns it into the
    DecryptionError a moved value gets)."""


def _destroyed(key_id: int, scope: str) -> KeyDestroyedError:
    return KeyDestroyedError(
        f"data key {key_id} of scope {scope!r} was destroyed; "
        "values under it cannot be read any more"
    )
