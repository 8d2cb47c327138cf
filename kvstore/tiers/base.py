"""The interface every tier implements, and the byte-bounded LRU index the local tiers share.

A tier only stores, finds and forgets entries and keeps them in LRU order; deciding where an entry goes,
what to evict and whether to demote or promote is the TieredStore's job. A tier never exceeds its byte
capacity: `put` raises TierFull instead, and the store evicts first.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kvstore.format import Entry


class TierFull(ValueError):
    """A put would take the tier over its byte capacity."""


class TierUnavailable(RuntimeError):
    """The tier's backend cannot be reached (e.g. Redis is down); the store goes on without it."""


@dataclass(frozen=True)
class TierUsage:
    entries: int
    bytes: int
    capacity_bytes: int


class Tier(ABC):
    """One level of the store. Implementations are thread-safe."""

    name: str
    capacity_bytes: int
    # Slow tiers (disk, Redis) are written by the store's write-behind worker, not by the caller.
    slow: bool = False
    # Whether put keeps references to the entry's tensors (so the store must hand it a private copy);
    # tiers that copy or serialize during put do not.
    keeps_tensors: bool = False
    # Pooled tiers (host) can have the bytes but not one free block of the size wanted (fragmentation,
    # or evicted blocks readers still hold): put raises TierFull and the store evicts more or waits.
    pooled: bool = False
    # Whether calls may wait on a network (Redis): the local tiers answer contains() from memory, so a
    # lookup over them alone can run on a server's event loop without a thread hop.
    networked: bool = False

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether `key` is stored; never changes LRU order."""

    def contains_many(self, keys: list[str]) -> list[bool]:
        """contains() for many keys (remote tiers batch this into one round trip)."""
        return [self.contains(k) for k in keys]

    @abstractmethod
    def get(self, key: str) -> Entry | None:
        """The entry, or None on a miss; a hit becomes the most recently used."""

    @abstractmethod
    def put(self, entry: Entry) -> None:
        """Store (or replace) `entry` as most recently used; TierFull if there is not room for it."""

    @abstractmethod
    def remove(self, key: str) -> int:
        """Forget `key`; returns the bytes freed (0 if it was absent)."""

    @abstractmethod
    def keys(self) -> list[str]:
        """All keys, least recently used first."""

    @abstractmethod
    def usage(self) -> TierUsage:
        """Entries and bytes held, and the capacity."""

    @abstractmethod
    def size_of(self, key: str) -> int | None:
        """Bytes `key` takes in this tier, or None if absent."""

    def entry_size(self, entry: Entry) -> int:
        """Bytes `entry` would take in this tier (memory tiers: tensor bytes; others: encoded bytes)."""
        return entry.nbytes

    def checksum_of(self, key: str) -> int | None:
        """The xxh3 checksum of the stored entry's bytes when the tier knows it without reading them
        (the disk tier keeps those it wrote or read); None otherwise. Lets an eviction skip writing
        down bytes the next tier already holds."""
        return None

    def lru_keys(self) -> Iterator[str]:
        """Keys from least to most recently used (eviction candidates, in order)."""
        return iter(self.keys())

    def free_bytes(self) -> int:
        return self.capacity_bytes - self.usage().bytes

    def wait_release(self, timeout: float) -> bool:
        """Wait for memory readers still hold to come back (pooled tiers); False: nothing to wait for."""
        return False

    def clear(self) -> None:
        for key in self.keys():
            self.remove(key)

    def close(self) -> None:  # noqa: B027 (optional hook: most tiers hold nothing to release)
        """Release connections and files."""


class LruIndex:
    """Key -> (value, nbytes) in LRU order with a byte total and a hard capacity. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be an int >= 0, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self.lock = threading.RLock()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, touch: bool = True) -> object | None:
        with self.lock:
            item = self._items.get(key)
            if item is None:
                return None
            if touch:
                self._items.move_to_end(key)
            return item[0]

    def size_of(self, key: str) -> int | None:
        item = self._items.get(key)
        return None if item is None else item[1]

    def add(self, key: str, value: object, nbytes: int) -> None:
        """Insert or replace as most recent; TierFull (nothing changed) if it would not fit."""
        with self.lock:
            old = self._items.get(key)
            freed = old[1] if old is not None else 0
            if self._bytes - freed + nbytes > self.capacity_bytes:
                raise TierFull(
                    f"{nbytes} bytes for {key} do not fit: {self._bytes - freed} of "
                    f"{self.capacity_bytes} bytes used"
                )
            self._items[key] = (value, nbytes)
            self._items.move_to_end(key)
            self._bytes += nbytes - freed

    def set_value(self, key: str, value: object) -> None:
        """Replace a held key's value (LRU order and bytes unchanged)."""
        with self.lock:
            item = self._items.get(key)
            if item is not None:
                self._items[key] = (value, item[1])

    def pop(self, key: str) -> tuple[object, int] | None:
        with self.lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._bytes -= item[1]
            return item

    def keys(self) -> list[str]:
        with self.lock:
            return list(self._items)

    def load(self, items: Iterable[tuple[str, object, int]]) -> None:
        """Fill in LRU order (oldest first) at start-up, ignoring capacity (the caller trims)."""
        with self.lock:
            for key, value, nbytes in items:
                self._items[key] = (value, nbytes)
                self._bytes += nbytes
