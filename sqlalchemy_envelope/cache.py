"""A bounded, thread-safe cache of unwrapped data keys.

Hard limits, checked when the cache is built: an entry is served for at most
``ttl`` seconds after it was loaded, and at most ``capacity`` entries are held
(least recently used go first). Concurrent cold loads of one entry coalesce:
the first caller loads, the others wait for its result, so sixteen threads
starting cold on one key cost one KMS call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import _runtime

V = TypeVar("V")

clock = time.monotonic


@dataclass
class Stats:
    """Counters of an envelope's key traffic (read them, do not write them)."""

    kms_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    keys_created: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class Cache(Generic[V]):
    """Entries with an expiry; ``get_or_load`` coalesces concurrent loads of one key."""

    def __init__(self, *, ttl: float, capacity: int, stats: Stats) -> None:
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
            raise ValueError("cache_ttl must be a positive, finite number of seconds")
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError("cache capacity must be a positive integer")
        self.ttl = float(ttl)
        self.capacity = capacity
        self._stats = stats
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._loading: dict[Hashable, concurrent.futures.Future[tuple[float, V]]] = {}

    def __repr__(self) -> str:
        return f"Cache(ttl={self.ttl}, capacity={self.capacity}, entries={len(self._entries)})"

    def __reduce__(self) -> Any:
        raise TypeError("a key cache cannot be pickled")

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> tuple[float, V]:
        """``(expires_at, value)``: from memory while fresh, else from ``load()``, once for
        all concurrent callers."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] > clock():
                    self._entries.move_to_end(key)
                    self._stats.cache_hits += 1
                    return entry
                self._stats.cache_misses += 1
                self._sweep()
                future = self._loading.get(key)
                owner = future is None
                if future is None:
                    future = self._loading[key] = concurrent.futures.Future()
            if owner:
                return self._load(key, load, future)
            try:
                return _runtime.wait(future)
            except _Abandoned:
                continue  # its loader was cancelled: load it here, or wait for another

    def _load(
        self, key: Hashable, load: Callable[[], V], future: concurrent.futures.Future[Any]
    ) -> tuple[float, V]:
        try:
            value = load()
        except Exception as exc:  # the outcome for every caller waiting on this load
            with self._lock:
                del self._loading[key]
            _settle(future.set_exception, exc)
            raise
        except BaseException:  # cancelled or interrupted: this caller's, not the waiters'
            with self._lock:
                del self._loading[key]
            _settle(future.set_exception, _Abandoned())
            raise
        entry = (clock() + self.ttl, value)
        with self._lock:
            del self._loading[key]
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        _settle(future.set_result, entry)
        return entry

    def put(self, key: Hashable, value: V) -> tuple[float, V]:
        entry = (clock() + self.ttl, value)
        with self._lock:
            self._sweep()
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry

    def _sweep(self) -> None:
        """Drop expired entries (under the lock), so an unwrapped key leaves memory after
        ``ttl`` at the next load at the latest, not only when pushed out by ``capacity``."""
        now = clock()
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            del self._entries[key]

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        with self._lock:
            for key in [k for k in self._entries if predicate(k)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class _Abandoned(Exception):
    """The caller loading a value was cancelled: a waiter loads it again."""


def _settle(outcome: Callable[[Any], None], value: Any) -> None:
    # A future cancelled meanwhile (not by a waiter: they shield it) has nobody waiting.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        outcome(value)
