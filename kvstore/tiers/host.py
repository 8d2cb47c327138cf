"""Host RAM tier: entries copied into one pre-allocated byte pool, read back without a copy.

A put copies the entry's tensors (and positions) into one block of a BytePool sized by the tier's byte
bound: memory that was used before, so the copy runs at memcpy speed instead of paying a page fault per
4 KiB of fresh memory. The stored entry's tensors are a lease on that block (see pool.py), and a get
returns them as they are (no copy, like LMCache's ref-counted memory objects). The block is reused only
when nothing refers to those tensors any more: evicting an entry that a reader (or the write-behind
queue) still holds leaves its block alone, counted as used, until the reader lets go.

`MemoryTier` is the plain variant that keeps the tensors it is given (used by DeviceTier, where the
tensors live on an accelerator).
"""

from __future__ import annotations

from typing import cast

import torch

from kvstore.format import Entry
from kvstore.tiers.base import LruIndex, Tier, TierFull, TierUsage
from kvstore.tiers.pool import ALIGN, BytePool, round_up


class MemoryTier(Tier):
    """Entries as the tensors they were put with, on `device`. The caller must hand over a private copy;
    gets return the stored tensors themselves (the store copies on the way out unless asked not to)."""

    name = "memory"
    keeps_tensors = True

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


class HostTier(MemoryTier):
    """Entries in a BytePool of `capacity_bytes` (host RAM). Thread-safe.

    `prefault`: touch the whole pool at start (RSS = capacity at once) so even the first puts run at
    memcpy speed; otherwise pages are faulted in by the first put that uses them and then kept.
    """

    name = "host"
    keeps_tensors = False  # put copies into the pool: the caller may reuse its tensors at once
    pooled = True

    def __init__(self, capacity_bytes: int, prefault: bool = False, min_entry_bytes: int = 0) -> None:
        super().__init__(capacity_bytes)  # validates capacity_bytes
        self.pool = BytePool(capacity_bytes, prefault=prefault)
        self.min_entry_bytes = min_entry_bytes  # see StoreConfig.host_min_entry_bytes

    def entry_size(self, entry: Entry) -> int:
        """Bytes of the entry's block: each tensor (and positions) rounded up to 8 bytes; at least 8,
        and at least `min_entry_bytes`."""
        return max(ALIGN, self.min_entry_bytes, sum(round_up(n) for n in _sizes(entry)))

    def put(self, entry: Entry) -> None:
        """Copy `entry` into a new block (replacing `entry.key`); TierFull if no block of its size is
        free (the pool may have the bytes but not in one piece, or readers may still hold them)."""
        size = self.entry_size(entry)
        if size > self.capacity_bytes:
            raise TierFull(
                f"entry {entry.key} ({size} bytes) is larger than the tier ({self.capacity_bytes})"
            )
        off = self.pool.alloc(size)
        if off is None:
            raise TierFull(
                f"no free block of {size} bytes for {entry.key}: {self.pool.used} of {self.capacity_bytes} "
                f"bytes in blocks ({self.pool.retired} held by readers after eviction)"
            )
        try:
            stored = _copy_into(self.pool.lease(off, size), entry)
        except BaseException:
            self.pool.free(off)
            raise
        with self._index.lock:
            old = self._index.pop(entry.key)
            self._index.add(entry.key, (stored, off), size)  # fits: the pool had the block
            if old is not None:
                replaced, _ = old
                self.pool.free(cast(tuple[Entry, int], replaced)[1])

    def get(self, key: str) -> Entry | None:
        """The stored entry itself: its tensors view the pool (read them, never write them); a reader
        holding them keeps the block from being reused even after eviction."""
        item = self._index.get(key)
        return None if item is None else item[0]  # type: ignore[index]

    def peek(self, key: str) -> Entry | None:
        item = self._index.get(key, touch=False)
        return None if item is None else item[0]  # type: ignore[index]

    def remove(self, key: str) -> int:
        with self._index.lock:
            item = self._index.pop(key)
            if item is None:
                return 0
            # retired until the last reference to the entry's tensors (ours included) is dropped
            self.pool.free(item[0][1])  # type: ignore[index]
            return item[1]

    def wait_release(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a block of an evicted entry to come back; True if one did."""
        return self.pool.wait_release(timeout)

    def usage(self) -> TierUsage:
        """Entries held, and bytes of pool blocks in use (including evicted blocks readers still hold)."""
        with self._index.lock:
            return TierUsage(len(self._index), self.pool.used, self.capacity_bytes)

    def free_bytes(self) -> int:
        """Bytes not held by stored entries (evicted blocks still held count as free: they come back
        when the holder lets go, and a put that needs them waits or evicts more; see TieredStore)."""
        with self._index.lock:
            return self.capacity_bytes - self._index.bytes


def _sizes(entry: Entry) -> list[int]:
    sizes = [t.numel() * t.element_size() for t in entry.tensors.values()]
    if entry.positions is not None:
        sizes.append(entry.positions.numel() * 8)
    return sizes


def _copy_into(block: torch.Tensor, entry: Entry) -> Entry:
    """The entry with its tensors (and positions) copied into consecutive 8-byte aligned parts of
    `block`, each a view of it (sharing its storage, so holding any of them holds the block)."""
    storage, base = block.untyped_storage(), block.storage_offset()
    at, out = 0, []
    parts = [*entry.tensors.values(), *([] if entry.positions is None else [entry.positions])]
    for t in parts:
        size = t.element_size()
        # set_ is ~2x cheaper than slicing and two views; offsets are in elements of t's dtype
        view = torch.empty(0, dtype=t.dtype).set_(storage, (base + at) // size, t.shape)  # type: ignore[call-overload]  # 3-argument set_ exists; the stubs list 1 and 4
        view.copy_(t)
        out.append(view)
        at += round_up(t.numel() * size)
    tensors = dict(zip(entry.tensors, out, strict=False))
    positions = None if entry.positions is None else out[-1]
    # validated when `entry` was built; these are the same shapes and dtypes
    copy = Entry.trusted(entry.key, entry.layout, tensors, positions, dict(entry.meta), frozen=True)
    if entry.frozen:  # the same bytes: its checksum (verified when a server decoded it) still holds
        copy._checksum = entry._checksum
    return copy
