"""BytePool: one pre-allocated region of host memory carved into blocks, handed out as tracked leases.

Why: copying a 5.6 MiB chunk into freshly allocated memory is bound by page faults (the kernel zeroes
every new page), about 2 GiB/s here; copying into memory that was used before runs at memcpy speed. So
the host tier copies each put into a block of one long-lived region, and reads hand out *leases* on
blocks instead of copies (as LMCache's pool and ref-counted memory objects do).

Blocks: sizes are multiples of ALIGN (8 bytes, so a tier's byte accounting matches `Entry.nbytes`);
free blocks are kept by exact size (chunks are mostly one size, so a freed block is reused as is) and
coalesced with free neighbours (so mixed sizes do not fragment the region for good); a request takes an
exact-size free block, else the best-fitting larger one (split), else fresh space at the top.

Leases: `lease(off)` returns a uint8 tensor over the block with its own storage. The block cannot be
reused while that tensor or any view of it is alive: the storage holds a numpy view whose weakref callback
reports the release. An owner gives a block up with `free(off)`; the memory is reused only after the
last lease dies. So an evicted entry that a reader (or the write-behind queue) still holds is never
overwritten: it is "retired" until released, and counts as used until then.

Memory: the region is reserved with `torch.empty` when the pool is created (virtual only); pages are
faulted in on first use and kept (never returned to the OS). `prefault=True` touches every page at
creation (RSS = capacity at once; the first puts then run at memcpy speed too), and then also asks for
transparent huge pages (MADV_HUGEPAGE): copies out of 2 MiB pages ran ~10% faster here (fewer TLB
misses). A lazily faulted pool does not ask: with this machine's THP defrag setting ("madvise") first
touches of such memory stalled in compaction (0.1-1.4 GiB/s measured, against ~0.5 without).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import sys
import threading
import time
import weakref

import torch

ALIGN = 8
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def round_up(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class BytePool:
    """`capacity` bytes of host memory in blocks. Thread-safe."""

    def __init__(self, capacity: int, prefault: bool = False, granule: int = ALIGN) -> None:
        """`granule`: block sizes are multiples of it and the region starts on a multiple of it, so
        every block is aligned to it (4096 lets O_DIRECT reads land in blocks)."""
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"BytePool capacity must be an int >= 0, got {capacity!r}")
        if granule < ALIGN or granule & (granule - 1):
            raise ValueError(f"BytePool granule must be a power of two >= {ALIGN}, got {granule!r}")
        self.capacity = capacity
        self.granule = granule
        # uint8 [capacity], uninitialized (no pages touched); owners write blocks through views of it
        align = max(granule, _HUGE if prefault else 1)
        raw = torch.empty(capacity + align, dtype=torch.uint8)
        start = (-raw.data_ptr()) % align
        self.tensor = raw[start : start + capacity]
        self._np = self.tensor.numpy()
        if prefault and capacity:
            _huge_pages(self.tensor)
            self.tensor.fill_(0)
        self._lock = threading.Lock()
        self._released: collections.deque[tuple[int, int]] = (
            collections.deque()
        )  # appended by weakref callbacks
        self._refs: dict[int, weakref.ref] = {}  # live lease weakrefs (a weakref must outlive its referent)
        self._size: dict[int, int] = {}  # allocated block offset -> size
        self._leases: dict[int, int] = {}  # allocated block offset -> live leases
        self._retired: set[int] = set()  # freed by the owner, still leased
        self._free: dict[int, int] = {}  # free block offset -> size (below _top)
        self._free_end: dict[int, int] = {}  # free block end -> offset (to coalesce with the next block)
        self._by_size: dict[int, set[int]] = {}  # size -> free block offsets
        self._top = 0  # [_top, capacity) was never handed out
        self._used = 0  # bytes in allocated blocks (owned or retired)
        self._releases = 0  # blocks given back so far
        self._failed_at = 0  # _releases when an alloc last found no room

    # ---- allocation ----------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new block of at least `nbytes` (rounded to the granule), or None if no room."""
        size = -(-max(nbytes, 1) // self.granule) * self.granule
        with self._lock:
            self._drain()
            off = self._take_free(size)
            if off is None and self._top + size <= self.capacity:
                off, self._top = self._top, self._top + size
            if off is None:
                self._failed_at = self._releases
                return None
            self._size[off] = size
            self._used += size
            return off

    def _take_free(self, size: int) -> int | None:
        exact = self._by_size.get(size)
        if exact:
            off = exact.pop()
            self._unlink_free(off)
            return off
        fits = [(s, o) for o, s in self._free.items() if s > size]
        if not fits:
            return None
        have, off = min(fits)  # best fit: keeps large free blocks for large requests
        self._unlink_free(off)
        self._link_free(off + size, have - size)
        return off

    def free(self, off: int) -> None:
        """The owner is done with the block; it is reused once no lease holds it."""
        with self._lock:
            self._drain()
            if off not in self._size or off in self._retired:
                raise ValueError(f"block at {off} is not allocated (double free?)")
            if self._leases.get(off):
                self._retired.add(off)
            else:
                self._release_block(off)

    def _release_block(self, off: int) -> None:
        size = self._size.pop(off)
        self._releases += 1
        self._leases.pop(off, None)
        self._retired.discard(off)
        self._used -= size
        end = off + size
        if end in self._free:  # coalesce with the free block after it
            size += self._free[end]
            self._unlink_free(end)
        if off in self._free_end:  # and with the one before it
            before = self._free_end[off]
            size += self._free[before]
            self._unlink_free(before)
            off = before
        if off + size == self._top:
            self._top = off  # give it back to the untouched top
        else:
            self._link_free(off, size)

    def _link_free(self, off: int, size: int) -> None:
        if size:
            self._free[off] = size
            self._free_end[off + size] = off
            self._by_size.setdefault(size, set()).add(off)

    def _unlink_free(self, off: int) -> None:
        size = self._free.pop(off)
        del self._free_end[off + size]
        group = self._by_size[size]
        group.discard(off)
        if not group:
            del self._by_size[size]

    # ---- access --------------------------------------------------------------------------------

    def view(self, off: int, nbytes: int | None = None) -> torch.Tensor:
        """An untracked uint8 view of a block (for the owner's own writes and reads)."""
        size = self._size[off] if nbytes is None else nbytes
        return self.tensor[off : off + size]

    def lease(self, off: int, nbytes: int | None = None) -> torch.Tensor:
        """A uint8 tensor over the block (first `nbytes` of it) that keeps the block from being reused
        while it, or any view of it, is alive. The caller holds the lock that keeps `off` allocated."""
        size = self._size[off] if nbytes is None else nbytes
        arr = self._np[off : off + size]
        with self._lock:
            self._leases[off] = self._leases.get(off, 0) + 1
        # a plain weakref callback (weakref.finalize costs ~3x more per lease)
        released = self._released

        def on_release(r: weakref.ref, off: int = off) -> None:
            released.append((id(r), off))

        ref = weakref.ref(arr, on_release)
        self._refs[id(ref)] = ref
        return torch.from_numpy(arr)

    def _drain(self) -> None:
        """Account lease releases (callbacks only append to a deque: they may run inside our lock)."""
        while self._released:
            ref_id, off = self._released.popleft()
            del self._refs[ref_id]
            left = self._leases[off] - 1
            self._leases[off] = left
            if not left and off in self._retired:
                self._release_block(off)

    def wait_release(self, timeout: float) -> bool:
        """Wait until a block comes back after the last failed alloc (or `timeout` s pass); True if one
        did. False at once when no retired block could come back."""
        start = time.monotonic()
        collected = False
        while True:
            with self._lock:
                self._drain()
                if self._releases > self._failed_at:
                    return True
                if not self._retired:
                    return False
            waited = time.monotonic() - start
            if waited >= timeout:
                return False
            if waited > 0.05 and not collected:  # a reference cycle (a kept traceback) may hold one
                gc.collect()
                collected = True
            time.sleep(0.0005)

    # ---- accounting ----------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes in allocated blocks, including retired ones that readers still hold."""
        with self._lock:
            self._drain()
            return self._used

    @property
    def retired(self) -> int:
        """Bytes freed by their owner but still leased (reusable once the readers let go)."""
        with self._lock:
            self._drain()
            return sum(self._size[o] for o in self._retired)

    def leased(self, off: int) -> int:
        with self._lock:
            self._drain()
            return self._leases.get(off, 0)


def _huge_pages(region: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages over the region's whole 2 MiB pages (best effort)."""
    length = region.numel() // _HUGE * _HUGE
    if sys.platform != "linux" or not length:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(region.data_ptr()), ctypes.c_size_t(length), _MADV_HUGEPAGE)
