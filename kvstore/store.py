"""TieredStore: places entries across tiers (fastest first), demotes on eviction, promotes on a hit.

Rules:
- a put lands in the fastest tier with room; making room evicts that tier's least recently used unpinned
  entries, and each eviction demotes to the next tier (unless that tier holds the very same bytes); the
  last tier drops;
- a hit in a lower tier is copied up to the top tier (the lower copy stays, so a later eviction is free);
- `lookup` / `contains` never move data and never change LRU order;
- pinned entries are never evicted; a put that finds every tier full of pinned entries is a ValueError;
  pins are saved beside the disk tier and restored at start (kvstore/pins.py);
- slow tiers (disk, Redis) are written by a worker thread when `write_behind` (see StoreConfig);
- a tier that fails (Redis down) is skipped for `redis_retry_s` and reported in `health()`/`stats()`;
  the store goes on with the others;
- a put replaces the key: no older copy is served after it, also when the newer copy's write-down fails
  (the older copies below are removed then; see `_write_down`);
- `close()` refuses later puts, waits for those under way, and finishes every queued write.

Locking: one lock per tier, always taken top-down (a placement in tier i may cascade into i+1), so
cascades cannot deadlock. Tier I/O for a hit happens outside the store's locks.

Memory: the host tier copies puts into a pre-allocated pool and hands out leases (zero-copy views that
keep their block from being reused); `get(copy=False)` returns such a lease. An evicted entry that a
reader or the write-behind queue still holds keeps its block until released; a put that finds no free
block evicts further, and when nothing is left to evict waits up to `lease_wait_s` for readers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Iterable
from typing import Any

import torch

from kvstore.config import StoreConfig
from kvstore.format import Entry
from kvstore.keyfile import read_keys, write_keys
from kvstore.pins import FILE_NAME as PINS_FILE
from kvstore.pins import PinSet
from kvstore.tiers.base import Tier, TierFull, TierUnavailable
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.redis_tier import RedisTier

log = logging.getLogger("kvfuse.kvstore")
SHADOWS_FILE = "shadowed.msgpack"  # beside the disk tier: shadowed keys across a restart (see close)
_COUNTERS = ("hits", "misses", "puts", "evictions", "demotions", "promotions", "dropped", "faults")
_STOP = object()


def build_tiers(config: StoreConfig) -> list[Tier]:
    """The tiers a config asks for, fastest first."""
    tiers: list[Tier] = []
    if config.device_bytes:
        tiers.append(DeviceTier(config.device_bytes, config.device))
    if config.host_bytes:
        tiers.append(HostTier(config.host_bytes, config.host_prefault, config.host_min_entry_bytes))
    if config.disk_path:
        tiers.append(
            DiskTier(config.disk_path, config.disk_bytes, config.disk_fsync, config.disk_read_pool_bytes)
        )
    if config.redis_url:
        tiers.append(
            RedisTier(
                config.redis_url,
                config.redis_bytes,
                config.redis_prefix,
                config.redis_ttl_s,
                config.redis_timeout_s,
            )
        )
    return tiers


class TieredStore:
    """Entries by key across the configured tiers. Thread-safe.

    Use `TieredStore(StoreConfig(...))`, or pass `tiers=` to assemble tiers by hand (tests, tools).
    """

    def __init__(self, config: StoreConfig | None = None, tiers: list[Tier] | None = None) -> None:
        self.config = config or StoreConfig()
        self.tiers = tiers if tiers is not None else build_tiers(self.config)
        if not self.tiers:
            raise ValueError("a TieredStore needs at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self._locks = [threading.RLock() for _ in self.tiers]
        self._counts = {t.name: dict.fromkeys(_COUNTERS, 0) for t in self.tiers}
        self._count_lock = threading.Lock()
        # pins live beside the disk tier (when there is one), so a restart keeps them
        disk = next((t for t in self.tiers if isinstance(t, DiskTier)), None)
        self._pinned = PinSet(None if disk is None else disk.root / PINS_FILE)
        self._down: dict[str, tuple[float, str]] = {}  # tier name -> (retry at, last error)
        self._pending: dict[str, Entry] = {}  # queued for a slow tier, still readable
        self._pending_lock = threading.Lock()
        # Queued slow writes per key: a write is done (and skipped if the key was removed meanwhile)
        # in queue order, and the key leaves `_pending` only with its last queued write.
        self._queued: dict[str, int] = {}
        # The key whose queued write the worker is doing now (taken under `_pending_lock` with its
        # `wanted` check): remove() waits for it, so the copy that write lands is removed by the walk
        # itself; undone afterwards, a get in between had promoted it into the top tier for good.
        self._inflight: str | None = None
        self._inflight_done = threading.Condition(self._pending_lock)
        self._remove_lock = threading.Lock()  # removes and clears one at a time (see remove)
        # Puts per key bucket: a get that read a lower tier promotes only if no put of a key in the same
        # bucket happened meanwhile (it would copy an old version over the new one). Fixed size: a
        # collision only skips a promotion.
        self._put_stamps = [0] * _STAMP_BUCKETS
        # Removes per key bucket, changed at the start and at the end of each (removes run one at a
        # time, under `_remove_lock`: odd = one under way). A removal walks down the tiers, so while
        # it runs an older copy below may be all that is left; a get that read a lower tier while a
        # remove in its bucket ran or since it began serves nothing (a miss; a collision is a miss).
        self._remove_stamps = [0] * _STAMP_BUCKETS
        # Keys whose newest copy was dropped while a networked tier (Redis) was unreachable: that tier
        # may still hold an older version, which is never served (a miss) and is removed once reachable.
        # With a disk tier they are saved beside it at close and read back here: after a restart the
        # older copy must stay unserved too. (Lost in a crash; without a disk tier, in any restart.)
        self._shadow_file = None if disk is None else disk.root / SHADOWS_FILE
        self._shadowed: set[str] = self._load_shadows()
        self._shadows_lost = 0  # keys not shadowed because `_MAX_SHADOWED` was reached (see stats)
        self._queue_waits = 0  # slow writes whose caller waited because the queue was full
        self._queue: queue.Queue = queue.Queue(maxsize=self.config.write_queue)
        self._worker: threading.Thread | None = None
        # close(): puts are refused once it starts and the ones under way are waited for (a put that
        # placed after `_persist` ran, or queued after the worker stopped, was lost). `_enqueue_lock`
        # makes "the worker still takes writes" and "queue it" one step against close's stop.
        self._closing = threading.Condition()
        self._closed = False
        self._puts_active = 0
        self._enqueue_lock = threading.Lock()
        self._accepting = False  # the worker takes queued writes (set with it, cleared at close)
        self._stopped = threading.Event()  # the worker did its last queued write
        self._close_done = threading.Event()  # close() finished (a second caller waits for it)
        if self.config.write_behind and any(t.slow for t in self.tiers):
            self._worker = threading.Thread(target=self._drain, name="kvstore-write-behind", daemon=True)
            self._accepting = True
            self._worker.start()
        self._pinned.load(self.contains)

    # ---- reading -------------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether any tier (or the write-behind queue) holds `key`; moves nothing."""
        return self.lookup([key]) == 1

    def lookup(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, are held somewhere (the longest cached prefix, in chunks).

        Never moves data or changes LRU order. Each tier is asked once for all still-missing keys (one
        round trip for Redis). Queued writes are checked just above the slow tiers, in the same order an
        entry moves down, so a concurrent demotion cannot make a held key look absent.
        """
        found = [False] * len(keys)
        for tier in self.tiers:
            if tier.slow:
                self._mark_pending(keys, found)
            todo = [i for i, hit in enumerate(found) if not hit]
            if not todo:
                break
            wanted = [keys[i] for i in todo]
            # a local tier marked down still answers from its index (see _read)
            hits = (
                tier.contains_many(wanted)
                if not tier.networked
                else self._call(tier, tier.contains_many, wanted, default=[False] * len(todo))
            )
            for i, hit in zip(todo, hits, strict=True):
                found[i] = hit and not (tier.networked and keys[i] in self._shadowed)
        return next((i for i, hit in enumerate(found) if not hit), len(keys))

    @property
    def lookup_is_local(self) -> bool:
        """Whether lookup() answers from memory (no networked tier): it never blocks on I/O or locks
        held during copies, so a server may call it on its event loop."""
        return not any(t.networked for t in self.tiers)

    def _mark_pending(self, keys: list[str], found: list[bool]) -> None:
        with self._pending_lock:
            if self._pending:
                for i, key in enumerate(keys):
                    found[i] = found[i] or key in self._pending

    def get(self, key: str, copy: bool = True) -> Entry | None:
        """The entry (promoted to the top tier if it came from a lower one), or None.

        With `copy` (the default) the caller owns the returned tensors. `copy=False` returns the stored
        bytes without a copy (a lease on the host pool, or the tier's own tensors): read them, never
        write them, and drop them when done (a held lease keeps its block from being reused).
        """
        bucket = _bucket(key)
        stamp, removes = self._put_stamps[bucket], self._remove_stamps[bucket]
        for j, tier in enumerate(self.tiers):
            if tier.slow:
                with self._pending_lock:
                    entry = self._pending.get(key)
                if entry is not None:
                    return self._copy(entry) if copy else entry
            if tier.networked and key in self._shadowed:
                with self._locks[j]:  # again under the lock: a newer copy may have landed there since
                    if key in self._shadowed:
                        self._forget_shadowed(j, key)
                self._count(tier, "misses")
                continue
            entry, lost = self._read(j, key)
            if lost:  # the copy there may be the newest: one below may be older (see _read)
                self._count(tier, "misses")
                return None
            if entry is None or (j > 0 and not self._no_remove_since(bucket, removes)):
                self._count(tier, "misses")
                if entry is None:
                    continue
                return None  # maybe an older copy a removal under way had uncovered
            self._count(tier, "hits")
            if j > 0 and self._promote(j, entry, stamp) and self.tiers[0].pooled:
                # serve the promoted host copy, so the lower tier's read buffer is released at once
                entry = self._peek(self.tiers[0], key) or entry
            return self._copy(entry) if copy else entry
        return None

    def _no_remove_since(self, bucket: int, removes: int) -> bool:
        """No remove of a key in `bucket` ran at any time since a get read `removes`."""
        now = self._remove_stamps[bucket]
        return now == removes and now % 2 == 0

    def _read(self, j: int, key: str) -> tuple[Entry | None, bool]:
        """(tier j's entry or None, lost). Also reads a local tier marked down after a write error:
        the newer copy it holds must hide the older ones below (a networked tier that is down is
        skipped, see _call). `lost`: a local tier held the key but its copy could not be read (an
        I/O error: a fault) or was corrupt (deleted; older copies below go too, as after a failed
        write). The get then stops there: serving a lower copy could serve an older version."""
        tier = self.tiers[j]
        if tier.networked:
            return self._call(tier, tier.get, key, default=None), False
        held, corrupt = tier.contains(key), getattr(tier, "corrupt", 0)
        try:
            entry = tier.get(key)
        except OSError as e:
            self._fault(tier, e)
            _release_frames(e)
            return None, True
        if self._usable(tier):
            self._down.pop(tier.name, None)  # it answered (as _call does)
        if entry is None and held and getattr(tier, "corrupt", 0) != corrupt:
            # (another key's corrupt read at the same moment also lands here: a needless miss)
            self._note_dropped(key, j + 1)
            return None, True
        return entry, False

    def _forget_shadowed(self, j: int, key: str) -> None:
        """Remove an older copy that networked tier j may hold under a dropped newer one; if tier j does
        not answer, the key stays shadowed (never served from it)."""
        tier = self.tiers[j]
        try:
            with self._locks[j]:
                tier.remove(key)
        except TierUnavailable as e:
            self._fault(tier, e)
            _release_frames(e)
            self._shadow(key)
            return
        self._shadowed.discard(key)

    def _shadow(self, key: str) -> None:
        """Never serve `key` from a networked tier until it is removed there (see `_shadowed`). Past
        `_MAX_SHADOWED` keys the older copy may come back: counted in stats as `shadows_lost`."""
        if key in self._shadowed or len(self._shadowed) < _MAX_SHADOWED:
            self._shadowed.add(key)
        else:
            self._shadows_lost += 1

    def _note_dropped(self, key: str, below: int) -> None:
        """A copy of `key` on its way into tier `below` (or lower) was dropped: older copies those tiers
        hold must not come back in its place. They are removed; one in a networked tier that cannot be
        reached now is never served (see `_shadowed`) and is removed once it answers."""
        for k in range(below, len(self.tiers)):
            tier = self.tiers[k]
            if tier.networked and not self._usable(tier):
                self._shadow(key)
            elif tier.networked:
                self._forget_shadowed(k, key)
            elif tier.contains(key):  # even while marked down: see _drop_older
                self._drop_older([k], key)

    def get_resident(self, key: str, copy: bool = True) -> Entry | None:
        """The entry when the top tier holds it in memory, else None (then `get` looks further): never
        touches a disk or the network and never promotes, so a server may call it on its event loop
        (a thread hop cost ~10% of a served 5.6 MiB get's CPU in a profile). A hit counts as in `get`."""
        top = self.tiers[0]
        if top.slow:
            return None
        entry = self._call(top, top.get, key, default=None)
        if entry is None:
            return None
        self._count(top, "hits")
        return self._copy(entry) if copy else entry

    def _promote(self, j: int, entry: Entry, stamp: int) -> bool:
        """Copy a lower-tier hit into a faster tier (never back into tier j itself), unless the key was
        put since the get began (`stamp`): the copy read may be older than what the put stored."""
        top = self.tiers[0]
        # a slow tier's entry is already a private copy; a memory tier's is shared with that tier
        copy = top.keeps_tensors and not self.tiers[j].slow
        stored = entry.to(getattr(top, "device", torch.device("cpu")), copy=copy)
        key = entry.key
        with self._locks[0]:  # puts place under it too: the stamp cannot change before we place
            if self._put_stamps[_bucket(key)] != stamp:
                return False
            if not self._place(0, stored, stop=j):
                return False
        self._count(self.tiers[j], "promotions")
        return True

    @staticmethod
    def _peek(tier: Tier, key: str) -> Entry | None:
        """A memory tier's entry without touching LRU order (None for other tiers)."""
        peek = getattr(tier, "peek", None)
        return None if peek is None else peek(key)

    @staticmethod
    def _copy(entry: Entry) -> Entry:
        return entry.to(torch.device("cpu"), copy=True)

    # ---- writing -------------------------------------------------------------------------------

    def put(self, entry: Entry, pin: bool = False, copy: bool = True) -> None:
        """Store `entry` (a private copy of its tensors unless `copy=False`), optionally pinned.

        ValueError (and nothing evicted or lost) if no tier has room because everything is pinned or the
        entry is larger than every tier; RuntimeError once close() has begun.
        """
        if not isinstance(entry, Entry):
            raise TypeError(f"put takes an Entry, got {type(entry).__name__}")
        with self._closing:
            if self._closed:
                raise RuntimeError(f"put of {entry.key}: the store is closed")
            self._puts_active += 1
        try:
            self._put(entry, pin, copy)
        finally:
            with self._closing:
                self._puts_active -= 1
                if self._closed and not self._puts_active:
                    self._closing.notify_all()  # close() waits for the last one

    def _put(self, entry: Entry, pin: bool, copy: bool) -> None:
        top = self.tiers[0]
        # `borrowed`: the entry still holds the caller's tensors; every placement that keeps references
        # (a memory tier that keeps tensors, the write-behind queue) copies first. The host tier copies
        # into its pool anyway, so the usual put makes exactly one copy.
        borrowed = copy and not top.keeps_tensors
        if copy and top.keeps_tensors:
            entry = entry.to(getattr(top, "device", torch.device("cpu")), copy=True)
        added_pin = pin and entry.key not in self._pinned  # a failed put keeps an older pin
        if added_pin:
            self._pinned.add(entry.key)  # before placing: no eviction may take it once placed
        try:
            # Under tier 0's lock (evictions from it take it too): no older copy of the key is written
            # down after this one is placed, and no promotion of an older copy lands over it.
            with self._locks[0]:
                self._put_stamps[_bucket(entry.key)] += 1
                # the shadow stays: a get already past tier 0 must not read the older copy it hides;
                # it goes once a copy of this key is written to that tier (_place_here)
                placed = self._place(0, entry, borrowed=borrowed, replace=True)
                # again once placed: a get that read the stamp before the put placed its copy, and
                # an old copy below it, must not promote that copy either
                self._put_stamps[_bucket(entry.key)] += 1
        except BaseException:
            if added_pin:
                self._pinned.discard(entry.key)
            raise
        if not placed:
            if added_pin:
                self._pinned.discard(entry.key)
            raise ValueError(
                f"no tier has room for entry {entry.key} ({entry.nbytes} bytes): every tier is full of "
                f"pinned entries or smaller than the entry; usage: {self._usage_summary()}"
            )
        self._count(self.tiers[0], "puts")
        if self.config.write_through:
            self._write_through(entry, borrowed)

    def _write_through(self, entry: Entry, borrowed: bool) -> None:
        # every slow tier gets this version (queued in order behind any older write of the key)
        for j, tier in enumerate(self.tiers):
            if tier.slow:
                self._place(j, entry, only=True, borrowed=borrowed)

    def _place(
        self,
        i: int,
        entry: Entry,
        stop: int | None = None,
        only: bool = False,
        borrowed: bool = False,
        replace: bool = False,
    ) -> bool:
        """Put `entry` in the fastest tier from `i` with room (slow tiers via the queue); False if none.

        `stop`: do not go below this tier (a promotion never demotes its own source).
        `only`: tier `i` or nothing. `borrowed`: the entry's tensors are the caller's (see put).
        `replace` (a put): once the entry is placed, older copies in the faster tiers that had no room
        for it are removed, or a get would still find them first.
        """
        last = i + 1 if only else (stop if stop is not None else len(self.tiers))
        older: list[int] = []
        for j in range(i, last):
            tier = self.tiers[j]
            # j > 0: a slow top tier is written directly; its callers hold locks[0], which the worker
            # needs for that tier, so waiting for queue room there would deadlock
            if (
                j > 0
                and tier.slow
                and self._worker is not None
                and threading.current_thread() is not self._worker
            ):
                # the worker tries tier j, then the ones below it; queued for j even while j is down,
                # so it is written after the key's older writes queued for j, never below them
                self._enqueue(j, self._copy(entry) if borrowed else entry)
                return self._drop_older(older, entry.key)
            if not self._usable(tier):
                # a local tier marked down (after a write error) still answers from memory: an older
                # copy there would be served again once it is back, above this one
                if replace and not tier.networked and tier.contains(entry.key):
                    older.append(j)
                continue
            if self._place_here(j, self._copy(entry) if borrowed and tier.keeps_tensors else entry):
                return self._drop_older(older, entry.key)
            if replace and self._call(tier, tier.contains, entry.key, default=False):
                older.append(j)
        return False

    def _drop_older(self, tiers: Iterable[int], key: str) -> bool:
        """Remove `key` from these tiers (copies a newer one replaces); True, for `_place`'s return.

        A local tier is asked even while marked down after a write error (its index is in memory):
        the older copy it holds must not be served once it is back. A networked tier that is down is
        skipped (`_note_dropped` shadows its copy)."""
        for j in tiers:
            tier = self.tiers[j]
            with self._locks[j]:
                if tier.networked:
                    if self._call(tier, tier.remove, key, default=None) is not None:
                        self._shadowed.discard(key)  # nothing left there to hide (as _forget_shadowed)
                else:
                    self._remove_local(tier, key)
        return True

    def _remove_local(self, tier: Tier, key: str) -> None:
        """tier.remove for a local tier, even while it is marked down. The index forgets the key even
        when the file stays (DiskTier.remove records it for the next start); an OSError means that
        record failed too, so a restart may bring the entry back: a fault, shown in health()."""
        try:
            tier.remove(key)
        except OSError as e:
            self._fault(tier, e)

    def _place_here(self, j: int, entry: Entry) -> bool:
        tier = self.tiers[j]
        try:
            need = tier.entry_size(entry)
            with self._locks[j]:
                if not self._make_room(j, need, keep=entry.key):
                    return False
                if tier.pooled:
                    return self._put_pooled(j, entry)
                tier.put(entry)
                if tier.networked:  # this version is there now: nothing older to hide
                    self._shadowed.discard(entry.key)
                return True
        except TierUnavailable as e:
            self._fault(tier, e)
            _release_frames(e)
            return False
        except TierFull:  # another process filled a shared tier between our eviction and our put
            return False

    def _put_pooled(self, j: int, entry: Entry) -> bool:
        """Put into a pooled tier. The byte count said it fits, but the pool may lack one free block of
        that size: evicted blocks are still held (by the write-behind queue until written, or by
        readers), or sizes are mixed. While demotions are queued, wait for the worker to release their
        blocks (as the old copy-free demotion kept them in memory until written); otherwise evict more
        LRU entries, and when none is left wait for readers. Caller holds tier j's lock."""
        tier, wait = self.tiers[j], self.config.lease_wait_s
        while True:
            try:
                tier.put(entry)
                return True
            except TierFull:
                if self._pending and tier.wait_release(wait):
                    continue
                if not self._evict_one(j, keep=entry.key) and not tier.wait_release(wait):
                    return False

    def _evict_one(self, j: int, keep: str) -> bool:
        key = next((k for k in self.tiers[j].lru_keys() if k not in self._pinned and k != keep), None)
        if key is not None:
            self._evict(j, key)
        return key is not None

    def _make_room(self, j: int, need: int, keep: str) -> bool:
        """Evict LRU unpinned entries of tier j until `need` bytes are free; False (nothing evicted) if
        that is impossible."""
        tier = self.tiers[j]
        if need > tier.capacity_bytes:
            return False
        free = tier.free_bytes() + (tier.size_of(keep) or 0)
        if free >= need:
            return True
        victims = []
        for key in tier.lru_keys():
            if key in self._pinned or key == keep:
                continue
            victims.append(key)
            free += tier.size_of(key) or 0
            if free >= need:
                break
        if free < need:
            return False
        for key in victims:
            self._evict(j, key)
        return True

    def _evict(self, j: int, key: str) -> None:
        """Remove `key` from tier j, demoting it first unless the next tier holds the same bytes (a
        promoted copy, see `_same_below`). Any other copy is written down over a lower one."""
        tier = self.tiers[j]
        self._count(tier, "evictions")
        if j + 1 == len(self.tiers):
            self._count(tier, "dropped")
        else:
            entry = self._peek(tier, key) or tier.get(key)  # a lease: the block waits for the demotion
            if entry is None or self._same_below(j + 1, entry):
                pass  # gone meanwhile, or the next tier holds these very bytes (a promoted copy)
            elif self._place(j + 1, entry, replace=True):
                self._count(tier, "demotions")
            else:
                self._count(tier, "dropped")
                self._note_dropped(key, j + 1)
        tier.remove(key)
        if tier.networked:  # removed there: no older copy left to hide (shadows must drain, not pile up)
            self._shadowed.discard(key)

    def _same_below(self, k: int, entry: Entry) -> bool:
        """Whether tier k holds exactly `entry`'s bytes (same checksum; tiers that keep no checksums
        never say so), so writing it down would change nothing. Only then may an eviction skip the
        write: any other copy below may be an older version, and so may a write of the key still
        queued (it would land after this eviction)."""
        held = entry._checksum
        if held is None:
            return False
        with self._pending_lock:
            if self._queued.get(entry.key):
                return False
        tier = self.tiers[k]
        return self._call(tier, tier.checksum_of, entry.key, default=None) == held[1]

    # ---- write-behind ----------------------------------------------------------------------------

    def _enqueue(self, j: int, entry: Entry) -> None:
        """Queue a slow write; when the queue is full, wait for room. Once close() stopped the worker
        (a get's promotion may evict while it closes), write it here after the worker's last write."""
        with self._enqueue_lock:  # close() clears `_accepting` and queues the stop under it
            if self._accepting:
                self._queue_locked(j, entry)
                return
        # Written only once the worker is done, so no older queued write of the key lands over it.
        self._stopped.wait()
        self._write_down(j, entry)

    def _queue_locked(self, j: int, entry: Entry) -> None:
        with self._pending_lock:
            self._pending[entry.key] = entry
            self._queued[entry.key] = self._queued.get(entry.key, 0) + 1
        try:
            self._queue.put_nowait((j, entry))
        except queue.Full:
            # Back-pressure: wait for room. Writing it here instead could overtake an older queued
            # write of the same key, which would then land over it. The worker never waits here (it
            # writes its own cascades directly) and takes no lock a waiting caller holds (callers hold
            # memory tiers' locks and `_enqueue_lock`; the worker takes only slow tiers'), so the wait
            # always ends.
            self._queue_waits += 1
            self._queue.put((j, entry))

    def _write_down(self, j: int, entry: Entry) -> None:
        """Write `entry` into slow tier j (or below). When it fails, in any way, older copies of the
        key in those tiers are removed: with this newer version gone, they would be served in its place
        (a disk tier marked down after ENOSPC kept its older copy and served it once back)."""
        try:
            # replace: this is the newest version reaching the slow tiers (queued writes are done in
            # order), so a copy in tier j that it cannot overwrite (say j is full) is an older one
            placed = self._place(j, entry, replace=True)
        except Exception as e:
            self._fault(self.tiers[j], e)
            _release_frames(e)
            placed = False
        if not placed:
            self._count(self.tiers[j], "dropped")
            self._note_dropped(entry.key, j)

    def _unpend(self, entry: Entry) -> None:
        """One queued write of `entry.key` is done; the key leaves `_pending` with its last one."""
        with self._pending_lock:
            left = self._queued.get(entry.key, 0) - 1
            if left > 0:
                self._queued[entry.key] = left
                return
            self._queued.pop(entry.key, None)
            if self._pending.get(entry.key) is entry:
                del self._pending[entry.key]

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                j, entry = item
                with self._pending_lock:
                    wanted = entry.key in self._pending  # not removed since it was queued
                    if wanted:
                        self._inflight = entry.key
                if wanted:
                    try:
                        self._write_down(j, entry)
                    finally:
                        with self._pending_lock:
                            self._inflight = None
                            self._inflight_done.notify_all()
                    with self._pending_lock:
                        removed = entry.key not in self._pending
                    if removed:  # remove() ran while this write was under way: undo it
                        self._drop_older(range(j, len(self.tiers)), entry.key)
                self._unpend(entry)
            except Exception as e:  # the worker must outlive any one bad write
                self._fault(self.tiers[item[0]], e)
                _release_frames(e)
                self._unpend(item[1])
            finally:
                # drop our references before blocking on the next item: a demoted entry is a lease on
                # a host-pool block, which is reused only once nothing refers to it
                item = entry = None
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued slow write is done."""
        if self._worker is not None:
            self._queue.join()

    # ---- management ------------------------------------------------------------------------------

    def pin(self, key: str) -> None:
        """Never evict `key` (from whichever tier holds it); KeyError if it is not stored."""
        if not self.contains(key):
            raise KeyError(f"cannot pin {key!r}: not in the store")
        self._pinned.add(key)

    def unpin(self, key: str) -> None:
        self._pinned.discard(key)

    def is_pinned(self, key: str) -> bool:
        return key in self._pinned

    def remove(self, key: str) -> bool:
        """Forget `key` everywhere; True if any tier held it."""
        self._pinned.discard(key)
        # Under tier 0's lock, which every put, promotion and eviction that may queue or place the
        # key holds: none can queue the key again while the removal walks down the local tiers
        # (released between taking the queued write and removing the host copy, an eviction in
        # between queued it again). Only the worker runs meanwhile; it skips or undoes a write of a
        # key no longer pending. A networked last tier (Redis) is removed from with its own lock
        # held instead, taken before tier 0's is let go: puts go on while a slow Redis answers the
        # DEL, and a write of the key into that tier meanwhile (a put since) waits for the DEL to
        # land after it, as a put after the remove. Removes (and clear) run one at a time
        # (`_remove_lock`): the remove stamps' parity says whether one is under way.
        bucket = _bucket(key)
        last = len(self.tiers) - 1
        handover = last > 0 and self.tiers[last].networked
        with self._remove_lock:
            self._locks[0].acquire()
            top_held = True
            self._remove_stamps[bucket] += 1  # odd: under way (gets serve no lower copy, see get)
            try:
                with self._pending_lock:
                    removed = self._pending.pop(key, None) is not None
                    # a write of the key under way lands first (the worker never takes tier 0's lock)
                    self._inflight_done.wait_for(lambda: self._inflight != key)
                for j in range(last if handover else last + 1):
                    removed = self._remove_in(j, key) or removed
                if handover:
                    with self._locks[last]:
                        self._put_stamps[bucket] += 1  # (see below) before tier 0's lock is let go
                        self._locks[0].release()
                        top_held = False
                        removed = self._remove_in(last, key) or removed
            finally:
                if top_held:
                    # a get that read a lower copy before it was removed promotes (under tier 0's
                    # lock) only once we let go: the put stamp, changed just before, stops it; a get
                    # that began during the removal is stopped by the odd remove stamp
                    self._put_stamps[bucket] += 1
                    self._locks[0].release()
                self._remove_stamps[bucket] += 1
        return removed

    def _remove_in(self, j: int, key: str) -> bool:
        """Remove `key` from tier j; whether it held it. A local tier is asked even while marked down
        (its index is in memory, see _drop_older); a networked one that is down or fails now keeps
        the key shadowed: never served from it, removed once it answers."""
        tier = self.tiers[j]
        with self._locks[j]:
            if not tier.networked:
                held = tier.contains(key)
                self._remove_local(tier, key)
                return held
            if self._usable(tier):
                try:
                    return bool(tier.remove(key))
                except TierUnavailable as e:
                    self._fault(tier, e)
                    _release_frames(e)
            self._shadow(key)
            return False

    def keys(self) -> list[str]:
        """Every stored key once (top tier first, LRU order within a tier)."""
        seen: dict[str, None] = {}
        for tier in self.tiers:
            seen.update(dict.fromkeys(self._call(tier, tier.keys, default=[])))
        with self._pending_lock:
            seen.update(dict.fromkeys(self._pending))
        return list(seen)

    def clear(self) -> None:
        """Forget everything (pins too). TierUnavailable, naming the tier, if a networked tier is down
        or its clear fails: then no local tier is cleared and the shadows stay.

        Why refuse rather than clear the rest: a Redis that was skipped keeps its copies, and with the
        shadows emptied they were served again once it answered (a cleared key came back); it cannot
        be listed while down, so its keys cannot be shadowed instead. The networked tiers go first, so
        a failure leaves the local tiers' (newer or equal) copies above whatever Redis still holds, and
        the shadows that hide its older ones; the caller sees the error and may retry."""
        self.flush()
        for tier in self.tiers:
            if tier.networked and not self._usable(tier):
                down = self._down.get(tier.name)
                raise TierUnavailable(
                    f"clear: tier {tier.name} is down ({down and down[1]}); nothing cleared"
                )
        # networked tiers first, then the local ones top-down
        order = [j for j, t in enumerate(self.tiers) if t.networked]
        order += [j for j, t in enumerate(self.tiers) if not t.networked]
        # like remove() for every key at once: under tier 0's lock, no get serves a lower copy while
        # the tiers are cleared (what is left below may be older), nor promotes one after
        with self._remove_lock, self._locks[0]:
            self._bump_all(self._remove_stamps)  # odd: a removal under way in every bucket
            try:
                for j in order:
                    tier = self.tiers[j]
                    if not tier.networked:  # the networked ones are cleared: drop queued writes
                        with self._pending_lock:
                            self._pending.clear()
                    with self._locks[j]:
                        if not self._clear_tier(tier):
                            raise TierUnavailable(
                                f"clear: tier {tier.name} failed; "
                                + ("no local tier cleared" if tier.networked else "entries may stay there")
                            )
            finally:
                self._bump_all(self._remove_stamps)
                self._bump_all(self._put_stamps)
        self._pinned.clear()
        self._shadowed.clear()  # nothing left there to hide

    def _clear_tier(self, tier: Tier) -> bool:
        """tier.clear (a local tier also while marked down); False if it failed (a fault)."""
        if tier.networked:
            return self._call(tier, tier.clear, default=False) is not False
        try:
            tier.clear()
        except OSError as e:
            self._fault(tier, e)
            return False
        return True

    @staticmethod
    def _bump_all(stamps: list[int]) -> None:
        for i in range(len(stamps)):
            stamps[i] += 1

    def close(self) -> None:
        """Refuse later puts and wait for those under way, persist memory-only entries, finish queued
        writes, stop the worker, close the tiers. A second call does nothing."""
        with self._closing:
            if self._closed:
                closing = True
            else:
                closing, self._closed = False, True
        if closing:
            self._close_done.wait()  # a concurrent close() is still persisting and draining
            return
        try:
            self._close()
        finally:
            self._close_done.set()

    def _close(self) -> None:
        with self._closing:
            self._closing.wait_for(lambda: self._puts_active == 0)
        if self.config.persist_on_close:
            self._persist()
        if self._worker is not None:
            self.flush()
            with self._enqueue_lock:  # no write is queued behind the stop (see _enqueue)
                self._accepting = False
                self._queue.put(_STOP)
            self._worker.join()
            self._worker = None
        self._stopped.set()
        self._save_shadows()
        for tier in self.tiers:
            tier.close()

    def _load_shadows(self) -> set[str]:
        if self._shadow_file is None:
            return set()
        try:
            keys = read_keys(self._shadow_file)
        except (OSError, ValueError) as e:
            # it cannot tell which Redis copies are older than what was dropped: refuse to serve them
            raise OSError(f"unreadable {self._shadow_file} ({e}); fix or delete it") from e
        return set(keys[:_MAX_SHADOWED])

    def _save_shadows(self) -> None:
        """Keys still shadowed at close, for the next start (only when there is a networked tier: a
        store opened without Redis leaves a file written by one with Redis alone)."""
        if self._shadow_file is None or not any(t.networked for t in self.tiers):
            return
        try:
            write_keys(self._shadow_file, set(self._shadowed))
        except OSError as e:
            log.error(
                "shadowed keys not saved to %s (%s): after a restart, Redis may serve older copies "
                "of %d keys",
                self._shadow_file,
                e,
                len(self._shadowed),
            )

    def _persist(self) -> None:
        """Copy entries held in memory tiers into the first slow tier, most recently used last. Slower
        memory tiers first: a faster tier's copy of a key is never older (a put removes older copies
        above where it lands), so it is the one written last, in queue order."""
        slow = next((j for j, t in enumerate(self.tiers) if t.slow), None)
        if slow is None:
            return
        for tier in reversed(self.tiers[:slow]):
            for key in tier.lru_keys():
                entry = self._peek(tier, key)
                # a promoted copy's source is still below: nothing to write; any other copy is
                # written over what the slow tier holds (maybe an older version)
                if entry is not None and not self._same_below(slow, entry):
                    # like a queued write: when it cannot be written, older copies below go too
                    self._write_down(slow, entry)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- health and stats ------------------------------------------------------------------------

    def _call(self, tier: Tier, fn: Any, *args: Any, default: Any) -> Any:
        """Run a tier call; a tier that is down gives `default` and is skipped until its retry time."""
        if not self._usable(tier):
            return default
        try:
            result = fn(*args)
        except TierUnavailable as e:
            self._fault(tier, e)
            _release_frames(e)
            return default
        self._down.pop(tier.name, None)
        return result

    def _usable(self, tier: Tier) -> bool:
        down = self._down.get(tier.name)
        return down is None or time.monotonic() >= down[0]

    def _fault(self, tier: Tier, error: BaseException) -> None:
        self._count(tier, "faults")
        self._down[tier.name] = (time.monotonic() + self.config.redis_retry_s, str(error))

    def _count(self, tier: Tier, name: str) -> None:
        with self._count_lock:
            self._counts[tier.name][name] += 1

    def _usage_summary(self) -> str:
        parts = []
        for tier in self.tiers:
            u = self._call(tier, tier.usage, default=None)
            parts.append(f"{tier.name}: " + ("down" if u is None else f"{u.bytes}/{u.capacity_bytes} bytes"))
        return ", ".join(parts) + f"; pinned: {len(self._pinned)}"

    def health(self) -> dict[str, Any]:
        """{"ok": every tier reachable, "tiers": {name: {"ok", "error"}}}; pings a tier that was down."""
        tiers = {}
        for tier in self.tiers:
            if tier.name in self._down and isinstance(tier, RedisTier):
                with contextlib.suppress(TierUnavailable):
                    tier.ping()
                    self._down.pop(tier.name, None)
            down = self._down.get(tier.name)
            tiers[tier.name] = {"ok": down is None, "error": None if down is None else down[1]}
        return {"ok": all(t["ok"] for t in tiers.values()), "tiers": tiers}

    def stats(self) -> dict[str, Any]:
        """Per tier: entries, bytes, capacity_bytes, the counters, ok/error; plus queue and pins."""
        out: dict[str, Any] = {"tiers": {}}
        for tier in self.tiers:
            u = self._call(tier, tier.usage, default=None)
            with self._count_lock:
                row: dict[str, Any] = dict(self._counts[tier.name])
            row["faults"] += getattr(tier, "faults", 0)  # errors the tier absorbed (disk: see _forget)
            row.update(
                entries=None if u is None else u.entries,
                bytes=None if u is None else u.bytes,
                capacity_bytes=tier.capacity_bytes,
                corrupt=getattr(tier, "corrupt", 0),
                ok=tier.name not in self._down,
                error=self._down.get(tier.name, (0, None))[1],
            )
            out["tiers"][tier.name] = row
        with self._pending_lock:
            out["pending_writes"] = len(self._pending)
        out["queue_waits"] = self._queue_waits
        out["shadowed"] = len(self._shadowed)
        out["shadows_lost"] = self._shadows_lost
        out["pinned"] = len(self._pinned)
        return out


def _release_frames(error: BaseException | None) -> None:
    """Clear the finished frames of a handled tier failure and of its causes. A client library's
    exception and its frames form reference cycles, and through the frames' callers they keep our
    locals alive until the next garbage collection: an evicted entry's host-pool lease among them,
    so its block stayed unusable and later puts evicted more than they needed (seen with Redis down)."""
    seen = 0
    while error is not None and seen < 16:
        traceback.clear_frames(error.__traceback__)
        error, seen = error.__cause__ or error.__context__, seen + 1


_STAMP_BUCKETS = 4096
# Keys, not bytes: key length is bounded (the store's own keys are 32 hex digits, the service's at most
# 200 chars), so this bounds memory at ~130 MB with the former and ~300 MB with the latter (a set
# entry measured with tracemalloc: 123 and 291 bytes); past it, an outage's older copies may come back
_MAX_SHADOWED = 1 << 20


def _bucket(key: str) -> int:
    return hash(key) % _STAMP_BUCKETS
