"""Host RAM tier: entries kept as tensors in a byte-bounded LRU (no serialization on the hot path)."""

from __future__ import annotations

import torch

from kvstore.format import Entry
from kvstore.tiers.base import LruIndex, Tier, TierUsage


class HostTier(Tier):
    """Entries as tensors on `device` (CPU here; DeviceTier puts them on an accelerator).

    The tier keeps whatever entry it is given (the store hands it a private copy) and hands out the stored
    entry itself; the store copies on the way out so callers can never write into the cache.
    """

    name = "host"

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._index = LruIndex(capacity_bytes)
        self.capacity_bytes = capacity_bytes

    def contains(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> Entry | None:
        return self._index.get(key)  # type: ignore[return-value]

    def peek(self, key: str) -> Entry | None:
        """The entry without touching LRU order."""
        return self._index.get(key, touch=False)  # type: ignore[return-value]

    def put(self, entry: Entry) -> None:
        if any(t.device != self.device for t in entry.tensors.values()):
            entry = entry.to(self.device, copy=False)
        self._index.add(entry.key, entry, entry.nbytes)

    def remove(self, key: str) -> int:
        item = self._index.pop(key)
        return 0 if item is None else item[1]

    def keys(self) -> list[str]:
        return self._index.keys()

    def size_of(self, key: str) -> int | None:
        return self._index.size_of(key)

    def usage(self) -> TierUsage:
        with self._index.lock:
            return TierUsage(len(self._index), self._index.bytes, self.capacity_bytes)
