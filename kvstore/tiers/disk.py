"""Local disk tier: one file per entry, atomic write-and-rename, checksum verified on every read.

Files live at `<root>/<key[:2]>/<key>.kvf`. At start the index is rebuilt from the folder (LRU order from
modification times, which a hit refreshes), so a restart keeps every entry. A torn, truncated or corrupted
file fails its checksum on read: it is reported as a miss and deleted, never returned. A removed (or
corrupt) entry whose file cannot be deleted (EACCES, EPERM, EIO) is forgotten at once and named in
`removed.msgpack`, so the next start deletes it (or skips it) instead of serving it again (see
DiskTier.remove and DiskTier._forget).

Reads land in a reusable BytePool (`read_pool_bytes`, touched at start and backed by huge pages) instead
of fresh memory (which would cost a page fault per 4 KiB); the returned entry's tensors are a lease on
that block (zero copy), which is reused once they are dropped. What the page cache holds is copied from
it; the rest is read with O_DIRECT in one request (see DiskTier._read).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import xxhash

from kvstore.format import PREFIX_BYTES, CorruptEntry, Entry, decode, encode, encoded_nbytes, prefix_checksum
from kvstore.keyfile import read_keys, write_keys
from kvstore.tiers.base import LruIndex, Tier, TierUsage
from kvstore.tiers.pool import BytePool

log = logging.getLogger("kvfuse.disk")
SUFFIX = ".kvf"
TMP_PREFIX = ".tmp-"
REMOVED_FILE = "removed.msgpack"  # keys removed whose files could not be deleted (see DiskTier.remove)
MAX_REMOVED = 10_000  # keys REMOVED_FILE holds at most, the oldest dropped first (see _record_removed)
BLOCK = 4096  # read buffers start on page boundaries (O_DIRECT needs it)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere 0: the "direct" reads are buffered


class DiskTier(Tier):
    """Entries as files under `root`, at most `capacity_bytes` of them (file sizes)."""

    name = "disk"
    slow = True

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        fsync: bool = False,
        read_pool_bytes: int = 64 << 20,
    ) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync  # survive power loss, not just a process restart; costs a flush per put
        self._index = LruIndex(capacity_bytes)
        # Prefaulted, in transparent huge pages: an O_DIRECT read is one device request per run of
        # physically contiguous memory (this virtio disk takes 254 segments a request), so into 4 KiB
        # pages a 5.6 MiB read was six requests and ran 1.0-2.0 GiB/s depending on where the pages
        # happened to lie, into 2 MiB pages 2.1-3.1 GiB/s (side by side, README KV store benchmark).
        self._reads = BytePool(read_pool_bytes, prefault=True, granule=BLOCK)
        self.corrupt = 0  # files found torn or corrupt (and deleted) since start
        # I/O errors absorbed instead of raised: corrupt files that could not be deleted, and removed
        # ones whose record was dropped at MAX_REMOVED (see _forget, _record_removed)
        self.faults = 0
        self._direct = bool(_O_DIRECT)  # cleared when the file system refuses O_DIRECT
        self._clock = 0  # last mtime given out: strictly increasing, so equal timestamps never tie
        # removed, file not deleted: never indexed again (REMOVED_FILE); oldest first, at most MAX_REMOVED
        self._removed: dict[str, None] = {}
        self._rebuild()

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"invalid key for the disk tier: {key!r}")
        return self.root / key[:2] / (key + SUFFIX)

    def _rebuild(self) -> None:
        self._retry_removals()
        found = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                if sub.name.startswith(TMP_PREFIX):  # a key file's (keyfile.write_keys), left by a crash
                    with contextlib.suppress(OSError):
                        sub.unlink()
                continue
            for f in os.scandir(sub):
                if f.name.startswith(TMP_PREFIX):  # left by a crash mid-write
                    with contextlib.suppress(OSError):
                        os.unlink(f.path)
                elif f.name.endswith(SUFFIX) and f.name[: -len(SUFFIX)] not in self._removed:
                    st = f.stat()
                    found.append((st.st_mtime_ns, f.name[: -len(SUFFIX)], st.st_size))
        found.sort()
        self._clock = found[-1][0] if found else 0
        self._index.load((key, None, size) for _, key, size in found)
        while self._index.bytes > self.capacity_bytes:  # capacity was lowered since the last run
            self.remove(self._index.keys()[0])

    def contains(self, key: str) -> bool:
        return key in self._index

    def entry_size(self, entry: Entry) -> int:
        return encoded_nbytes(entry)

    def put(self, entry: Entry) -> None:
        final = self.path(entry.key)
        final.parent.mkdir(exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{entry.key}-{uuid.uuid4().hex}"
        parts = encode(entry)
        try:
            size = self._write(tmp, parts)  # inside: a write that fails (ENOSPC) leaves no temp file
            with self._index.lock:
                # the index keeps the file's checksum (see checksum_of); TierFull leaves it untouched
                old_value, old_size = self._index.get(entry.key, touch=False), self._index.size_of(entry.key)
                self._index.add(entry.key, prefix_checksum(parts[0]), size)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    # the rename did not happen: the file there (if any) is the old one, and the index
                    # must describe it, not claim this entry's checksum
                    self._index.pop(entry.key)
                    if old_size is not None:
                        self._index.add(entry.key, old_value, old_size)
                    raise
                self._stamp(final)
                if entry.key in self._removed:  # the file there is this entry now, not the removed one
                    del self._removed[entry.key]
                    self._save_removed(strict=False)  # if unsaved, the next start drops it: a miss
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write(self, tmp: Path, parts: list) -> int:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = 0
            for part in parts:
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    size += n
                    view = view[n:]
            if self.fsync:
                os.fsync(fd)
            return size
        finally:
            os.close(fd)

    def get(self, key: str) -> Entry | None:
        if key not in self._index:
            return None
        path = self.path(key)
        try:
            buf, ino, checksum = self._read(path)
        except FileNotFoundError:  # removed concurrently or by hand
            self._forget(key, None)
            return None
        try:
            # frozen: the read-pool block is not reused while the entry's tensors live, so the checksum
            # just verified also serves the host tier's copy when the entry is promoted
            entry = decode(buf.numpy().data, expect_key=key, checksum=checksum, frozen=True)
        except CorruptEntry:
            self.corrupt += 1
            self._forget(key, ino)
            return None
        self._touch(key, path)
        # only if no put replaced the file since it was read
        with self._index.lock, contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:
                self._index.set_value(key, checksum)
        return entry

    def _read(self, path: Path) -> tuple[torch.Tensor, int, int]:
        """The file's bytes (a read-pool lease), its inode, and xxh3-64 of the bytes after the prefix.

        What the page cache holds is copied from it (a buffered read that never waits on the device);
        the rest comes with O_DIRECT, one request straight into the page-aligned block, which with the
        cache dropped was faster than buffered reads here (README, KV store benchmark), while a file
        still cached is served at memcpy speed. Where O_DIRECT is refused (some file systems) or the
        pool is full, the rest is read buffered. The checksum is computed once the bytes are in.
        """
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            size = st.st_size
            buf, aligned = self._buffer(-(-size // BLOCK) * BLOCK)
            view = buf.numpy().data
            got = _read_cached(fd, view, size)
            if got < size and aligned and self._direct:
                got = self._read_direct(fd, view, got - got % BLOCK, size)
            got = _read_buffered(fd, view, got, size)
            # the checksum covers everything after the prefix
            return buf[:got], st.st_ino, xxhash.xxh3_64_intdigest(view[PREFIX_BYTES:got])
        finally:
            os.close(fd)

    def _read_direct(self, fd: int, view: memoryview, start: int, size: int) -> int:
        """Bytes [start, size) with O_DIRECT (`start` block-aligned), switched on for this descriptor
        only while reading (so the rest comes from the same file even if a put replaced it meanwhile);
        returns where the file's bytes in `view` now end (`start` when O_DIRECT is refused)."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        got = start
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
            while got < size:
                n = os.preadv(fd, [view[got:]], got)  # whole blocks, up to the block past the end
                if n <= 0:
                    break
                got += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # F_SETFL refused: this file system does not take O_DIRECT; a refused read would be an
            # alignment bug of ours. Either way buffered reads from now on, and say so once.
            log.warning("disk tier %s: O_DIRECT reads refused (%s); reading buffered", self.root, e)
            self._direct = False
            return start
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return min(got, size)

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A lease on a read-pool block (page-aligned: True), or fresh memory when the pool is full of
        held reads (False)."""
        off = self._reads.alloc(nbytes)
        if off is None:
            return torch.empty(nbytes, dtype=torch.uint8), False  # uninitialized: no memset
        buf = self._reads.lease(off, nbytes)
        self._reads.free(off)  # the block comes back when the lease (the entry's tensors) is dropped
        return buf, True

    def _touch(self, key: str, path: Path) -> None:
        """Most recently used, in memory and on disk (mtime), so the order survives a restart."""
        with self._index.lock:
            self._index.get(key)
            with contextlib.suppress(OSError):
                self._stamp(path)

    def _stamp(self, path: Path) -> None:
        """Set mtime from a strictly increasing clock (file systems round times; LRU needs an order)."""
        self._clock = max(time.time_ns(), self._clock + 1000)
        os.utime(path, ns=(self._clock, self._clock))

    def _forget(self, key: str, ino: int | None) -> None:
        """Drop a missing (`ino` None) or corrupt file, unless a fresh put replaced it meanwhile.

        A corrupt file that cannot be deleted (EACCES, EPERM, EIO) is forgotten all the same and
        recorded as remove() records one, so the get stays a miss instead of an OSError: it would
        fail its checksum on every read. The record is not strict (unlike remove's): if it is not
        saved either, a restart indexes the file again, and its next read finds it corrupt again,
        never serves it. Counted in `faults`."""
        with self._index.lock:
            path = self.path(key)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            except OSError:
                # the file cannot even be looked at (EIO): it may be a fresh put's, which a record
                # would hide until it is removed; keep the index entry, the next read decides
                return
            if current is not None and current != ino:
                return  # a put replaced the missing or corrupt file: that one is fresh
            try:
                if current is not None:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.faults += 1
                log.warning("disk tier %s: cannot delete corrupt entry %s (%s); forgotten", self.root, key, e)
                self._record_removed(key)
                self._save_removed(strict=False)
            self._index.pop(key)

    def checksum_of(self, key: str) -> int | None:
        """The checksum of the file this tier wrote or read for `key` (None after a restart until the
        file is read: the index is rebuilt from names and sizes only)."""
        value = self._index.get(key, touch=False)
        return value if isinstance(value, int) else None

    def remove(self, key: str) -> int:
        """Forget `key` and delete its file; the bytes freed (0 if absent).

        When the file cannot be deleted (a permission or I/O error), the entry is still forgotten at
        once (the store removes older copies this way: keeping one in the index would serve it over
        a newer copy below), and the key is saved in REMOVED_FILE so the next start retries the
        deletion and never indexes the file. Only when that cannot be saved either does remove raise
        the OSError: then a restart would bring the entry back, and the caller must know."""
        with self._index.lock:
            item = self._index.pop(key)
            if item is None:
                return 0
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning(
                    "disk tier %s: cannot delete removed entry %s (%s); recorded in %s",
                    self.root,
                    key,
                    e,
                    REMOVED_FILE,
                )
                self._record_removed(key)
                self._save_removed(strict=True)
            return item[1]

    def _retry_removals(self) -> None:
        """At start: delete the files of entries removed earlier whose deletion failed; keep the keys
        whose files are still there (never indexed)."""
        path = self.root / REMOVED_FILE
        try:
            keys = read_keys(path)
        except (OSError, ValueError) as e:
            # it cannot tell which files were removed: refuse rather than serve them
            raise OSError(f"disk tier {self.root}: unreadable {REMOVED_FILE} ({e}); fix or delete it") from e
        for key in keys:
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass
            except (OSError, ValueError):
                self._record_removed(key)
        if len(self._removed) < len(keys):
            self._save_removed(strict=False)  # still listed: deleted again (or found gone) next time

    def _record_removed(self, key: str) -> None:
        """Add `key` to the removed keys (newest last); past MAX_REMOVED, drop the oldest.

        Why a cap: the record is held in memory and rewritten (and fsynced) whole on every change,
        and on a disk whose deletions all fail (a failing or read-only device) it grew without end.
        Dropping the oldest key, its file is tried once more: gone or deleted now, nothing is lost.
        Still there, the restart guarantee weakens for that one entry: this process never serves it
        (it is not indexed), but the next start indexes the file again and may serve that removed,
        maybe older, version (for a corrupt file's key, harmless: its next read fails the checksum
        again). That case counts in `faults` and is logged."""
        self._removed[key] = None
        while len(self._removed) > MAX_REMOVED:
            oldest = next(iter(self._removed))
            del self._removed[oldest]
            try:
                os.unlink(self.path(oldest))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                self.faults += 1
                log.warning(
                    "disk tier %s: more than %d removed entries whose files cannot be deleted; dropped "
                    "the record of the oldest, %s (%s): the next start may serve it again",
                    self.root,
                    MAX_REMOVED,
                    oldest,
                    e,
                )

    def _save_removed(self, strict: bool) -> None:
        """Write the removed keys to REMOVED_FILE. `strict`: raise when that fails, else log it."""
        try:
            write_keys(self.root / REMOVED_FILE, self._removed)
        except OSError as e:
            if strict:
                raise
            log.warning("disk tier %s: %s not saved: %s", self.root, REMOVED_FILE, e)

    def keys(self) -> list[str]:
        return self._index.keys()

    def size_of(self, key: str) -> int | None:
        return self._index.size_of(key)

    def usage(self) -> TierUsage:
        with self._index.lock:
            return TierUsage(len(self._index), self._index.bytes, self.capacity_bytes)


def _read_cached(fd: int, view: memoryview, size: int) -> int:
    """Copy the part of the file the page cache holds from its start into `view`; how many bytes.
    Residency is asked with mincore (a buffered read of an uncached page would start readahead, which
    an O_DIRECT read of the same range then has to wait for)."""
    return _read_buffered(fd, view, 0, min(size, _resident_prefix(fd, size)))


def _resident_prefix(fd: int, size: int) -> int:
    """Bytes from the file's start whose pages are in the page cache: none or all as cachestat counts
    them, else mincore over a mapping that is never touched; the whole size where mincore is not
    available (the reads are then buffered)."""
    if _LIBC is None or size == 0:
        return size
    cached = _cached_pages(fd)  # one syscall answers the usual cases (all or nothing cached)
    if cached == 0:
        return 0
    if cached is not None and cached >= -(-size // mmap.PAGESIZE):
        return size
    addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return size
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            return size
        missing = np.flatnonzero((np.frombuffer(memoryview(vec), dtype=np.uint8) & 1) == 0)
        return (int(missing[0]) if missing.size else pages) * mmap.PAGESIZE
    finally:
        _LIBC.munmap(ctypes.c_void_p(addr), size)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recent")]


_SYS_CACHESTAT = 451  # Linux >= 6.5 (x86-64 and arm64 share the number)
_cachestat_works = sys.platform.startswith("linux")


def _cached_pages(fd: int) -> int | None:
    """Pages of the file in the page cache (cachestat), or None where the kernel lacks it. It costs
    one syscall, where mincore (a mapping, a vector, a scan) cost ~0.1 ms of CPU per 5.6 MiB file,
    more on a busy machine, paid on every read."""
    global _cachestat_works
    if _LIBC is None or not _cachestat_works:
        return None
    whole, stat = _CachestatRange(0, 0), _Cachestat()  # len 0: to the end of the file
    if _LIBC.syscall(_SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
        # ENOSYS (kernel < 6.5), EPERM (a seccomp filter that does not know it), EOPNOTSUPP: it will
        # not work later either; stop asking (a failed call on every read)
        _cachestat_works = ctypes.get_errno() in (errno.EINTR, errno.EAGAIN)
        return None
    return int(stat.cache)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.syscall.restype = ctypes.c_long
    return libc


_LIBC = _libc()


def _read_buffered(fd: int, view: memoryview, got: int, size: int) -> int:
    while got < size:
        n = os.preadv(fd, [view[got:size]], got)
        if n <= 0:
            break
        got += n
    return got
