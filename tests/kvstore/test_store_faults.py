"""Tier faults and races never serve an older version, hang a put, or let a removed key come back.

One test per finding of the fifth review (commit 1c51291), each of which failed on the code before it.
Real tiers (files, the real Redis, a private redis-server a test can stall) with faults injected by
subclasses: a write that raises EIO once, a write or read that waits for the test at a known point.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from kvstore_helpers import ENTRY_BYTES, hex_key, seed_of, tiny_entry

from kvstore import StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import DiskTier, HostTier, RedisTier, TierUnavailable
from kvstore.tiers import disk as disk_module
from kvstore.tiers.host import MemoryTier

WORKER = "kvstore-write-behind"
DOWN_S = 60.0  # redis_retry_s where a tier must stay down for the whole test


def _hold(entered: threading.Event, release: threading.Event) -> Callable[[], None]:
    def wait() -> None:
        entered.set()
        release.wait(10)

    return wait


class _Disk(DiskTier):
    """A real disk tier with injected faults: the next write of a key in `fail` raises EIO, and a write of
    a key in `gates` first runs its gate (in entry_size, before the store takes the tier's lock)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("read_pool_bytes", 1 << 20)
        super().__init__(*args, **kwargs)
        self.fail: set[str] = set()
        self.gates: dict[str, Callable[[], None]] = {}
        self.entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.release: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.before_remove: dict[str, Callable[[], None]] = {}  # run once by the next remove of the key

    def gate(self, key: str) -> None:
        """Writes of `key` wait at entry_size until `release[key]` is set."""
        self.gates[key] = _hold(self.entered[key], self.release[key])

    def entry_size(self, entry):
        gate = self.gates.get(entry.key)
        if gate is not None:
            gate()
        return super().entry_size(entry)

    def put(self, entry) -> None:
        if entry.key in self.fail:
            self.fail.discard(entry.key)
            raise OSError(errno.EIO, "injected write error", str(self.path(entry.key)))
        super().put(entry)

    def remove(self, key: str) -> int:
        hook = self.before_remove.pop(key, None)
        if hook is not None:
            hook()
        return super().remove(key)


class _Redis(RedisTier):
    """The real Redis tier; the next put of a key in `fail` raises TierUnavailable (a dropped
    connection) without reaching Redis, and a write of a key in `gates` first waits for the test."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail: set[str] = set()
        self.entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.release: dict[str, threading.Event] = {}
        self.before_remove: dict[str, Callable[[], None]] = {}  # run once by the next remove of the key
        self.read_done: defaultdict[str, threading.Event] = defaultdict(threading.Event)

    def entry_size(self, entry):
        if entry.key in self.release:
            self.entered[entry.key].set()
            self.release[entry.key].wait(10)
        return super().entry_size(entry)

    def put(self, entry) -> None:
        if entry.key in self.fail:
            self.fail.discard(entry.key)
            raise TierUnavailable(f"injected: Redis at {self.url} dropped the connection during put")
        super().put(entry)

    def remove(self, key: str) -> int:
        hook = self.before_remove.pop(key, None)
        if hook is not None:
            hook()
        if key in self.fail:
            self.fail.discard(key)
            raise TierUnavailable(f"injected: Redis at {self.url} dropped the connection during remove")
        return super().remove(key)

    def get(self, key: str):
        out = super().get(key)
        self.read_done[key].set()
        return out


class _Host(HostTier):
    """The real host tier; a get of a key in `release` waits for the test once it has missed or hit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.release: dict[str, threading.Event] = {}

    def get(self, key: str):
        out = super().get(key)
        release = self.release.pop(key, None)
        if release is not None:
            self.entered[key].set()
            release.wait(10)
        return out


def _memory() -> MemoryTier:
    """A one-entry top tier that keeps the tensors it is given. Where a test holds the write-behind
    worker, a pooled host tier would not do: the queued writes hold its pool blocks, so the next puts
    skip it and go to the queue as well."""
    return MemoryTier(ENTRY_BYTES)


def _disk_entries(n: int) -> int:
    return n * encoded_nbytes(tiny_entry(hex_key(0)))


# ---- a. a slow top tier is written by the caller ---------------------------------------------------


def test_a_slow_top_tier_never_deadlocks_a_put_on_a_full_write_queue(tmp_path):
    """host_bytes=0: the disk is the top tier. Its writes were queued while the putter held the top
    tier's lock, which the worker needs to write them: with the queue full the put waited for room
    the worker could never make. Here the worker (if it is given the first write) waits until a put
    is blocked on the full queue, then takes the lock."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(write_queue=1), tiers=[disk])  # as host_bytes=0 with a disk_path
    first = hex_key(0)

    def stall_worker() -> None:
        if threading.current_thread().name == WORKER:
            deadline = time.monotonic() + 10
            while not store._queue_waits and time.monotonic() < deadline:
                time.sleep(0.001)

    disk.gates[first] = stall_worker
    putter = threading.Thread(
        target=lambda: [store.put(tiny_entry(hex_key(i), seed=i)) for i in range(4)], daemon=True
    )
    putter.start()
    putter.join(20)
    assert not putter.is_alive(), "a put into the slow top tier deadlocked on the full write queue"
    store.close()
    assert all(seed_of(disk.get(hex_key(i))) == i for i in range(4))


# ---- b. a local tier marked down still hides what is below it --------------------------------------


def test_a_disk_marked_down_still_serves_its_newer_copy_over_redis(tmp_path, redis_url, redis_prefix):
    """Version 1 of a key in Redis (shared with other engines), version 2 written down to disk above it,
    then a write error marks the disk down: reads must still find version 2 there (they skipped the
    disk and Redis served version 1), and lookups must still count what only the disk holds."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    redis_tier = RedisTier(redis_url, 1 << 20, redis_prefix)
    config = StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S)
    store = TieredStore(config, tiers=[HostTier(ENTRY_BYTES), disk, redis_tier])
    k, only_disk, faulty = hex_key(1), hex_key(2), hex_key(3)
    redis_tier.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(k, seed=2))
    store.put(tiny_entry(only_disk))  # version 2 written down to disk
    store.put(tiny_entry(faulty))  # only_disk written down too
    store.flush()
    assert seed_of(disk.get(k)) == 2 and disk.contains(only_disk)
    disk.fail.add(faulty)
    store.put(tiny_entry(hex_key(4)))  # faulty's write-down fails: the disk is marked down
    store.flush()
    assert not store.health()["tiers"]["disk"]["ok"]
    assert seed_of(store.get(k)) == 2
    assert store.lookup([only_disk]) == 1
    store.close()


class _UnreadableDisk(_Disk):
    """A disk tier whose next read of a key in `unreadable` fails with EIO."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unreadable: set[str] = set()

    def get(self, key: str):
        if key in self.unreadable:
            self.unreadable.discard(key)
            raise OSError(errno.EIO, "injected read error", str(self.path(key)))
        return super().get(key)


def _older_in_redis_newer_on_disk(tmp_path, redis_url, redis_prefix, disk) -> tuple[TieredStore, RedisTier]:
    redis_tier = RedisTier(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk, redis_tier])
    redis_tier.put(tiny_entry(hex_key(1), seed=1))  # as another engine sharing this Redis left it
    store.put(tiny_entry(hex_key(1), seed=2))
    store.put(tiny_entry(hex_key(2)))  # version 2 written down to disk, above Redis's version 1
    store.flush()
    return store, redis_tier


def test_a_corrupt_disk_copy_does_not_uncover_the_older_redis_copy(tmp_path, redis_url, redis_prefix):
    """A torn write (say a crash without fsync) corrupts the disk's copy of version 2: the disk tier
    reports a miss and deletes it, and Redis's version 1 was then served in its place."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store, redis_tier = _older_in_redis_newer_on_disk(tmp_path, redis_url, redis_prefix, disk)
    k = hex_key(1)
    path = disk.path(k)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get(k) is None and disk.corrupt == 1
    assert store.get(k) is None and not redis_tier.contains(k)  # the older copy went with it
    store.close()


def test_a_disk_read_error_is_a_miss_not_the_older_redis_copy(tmp_path, redis_url, redis_prefix):
    """EIO reading version 2's file: the get was an OSError for the caller (or, with the disk marked
    down, Redis's version 1); it is a miss, the disk's fault is reported, and once the file reads
    again version 2 is served."""
    disk = _UnreadableDisk(tmp_path / "disk", _disk_entries(100))
    store, _ = _older_in_redis_newer_on_disk(tmp_path, redis_url, redis_prefix, disk)
    k = hex_key(1)
    disk.unreadable.add(k)
    assert store.get(k) is None
    assert store.stats()["tiers"]["disk"]["faults"] == 1
    disk.unreadable.add(k)  # again while the disk is marked down
    assert store.get(k) is None
    assert seed_of(store.get(k)) == 2
    store.close()


# ---- c. close persists through _write_down -----------------------------------------------------------


def test_close_with_the_disk_down_leaves_no_older_copy_for_the_restart(tmp_path):
    """Version 1 on disk, version 2 in memory only, the disk marked down by a write error: close cannot
    persist version 2, and must remove version 1 (it was kept and served after the restart).

    The top tier keeps its tensors (no pool): with a pooled host tier each put waited `lease_wait_s`
    for the worker to free the block of the entry it had just queued, and when the worker was slower
    than that (a loaded machine) it evicted one entry more, so faulty was written down early, its
    failing write never came and the disk was never marked down. Here nothing waits on the worker."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(redis_retry_s=DOWN_S), tiers=[MemoryTier(2 * ENTRY_BYTES), disk])
    k, faulty = hex_key(1), hex_key(2)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(faulty))
    store.put(tiny_entry(hex_key(3)))  # version 1 written down
    store.flush()
    assert seed_of(disk.get(k)) == 1 and not disk.contains(faulty)
    disk.fail.add(faulty)
    store.put(tiny_entry(k, seed=2))  # faulty evicted: its write fails, the disk is marked down
    store.flush()
    assert not disk.fail and not store.health()["tiers"]["disk"]["ok"]  # down for DOWN_S: all of close
    store.close()
    again = DiskTier(tmp_path / "disk", _disk_entries(100), read_pool_bytes=1 << 20)
    assert not again.contains(k)  # version 2 could not be written, and version 1 went


# ---- d. a second close waits for the first ----------------------------------------------------------


def test_a_second_close_returns_only_once_the_first_has_persisted(tmp_path):
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(), tiers=[HostTier(4 * ENTRY_BYTES), disk])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    disk.gate(k)  # close's persist of k: the worker waits inside the write
    first = threading.Thread(target=store.close, daemon=True)
    first.start()
    assert disk.entered[k].wait(10)
    on_disk_when_returned: list[bool] = []
    second = threading.Thread(
        target=lambda: (store.close(), on_disk_when_returned.append(disk.path(k).exists())), daemon=True
    )
    second.start()
    second.join(0.5)  # (before the fix it had returned by now)
    disk.release[k].set()
    second.join(10)
    first.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert on_disk_when_returned == [True]


# ---- e. remove against concurrent gets, evictions and a stalled Redis --------------------------------


class _PausedReadDisk(_Disk):
    """A disk tier whose get of `pause_key` sets `read_done` once the entry is read."""

    pause_key: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_done = threading.Event()

    def get(self, key: str):
        out = super().get(key)
        if key == self.pause_key:
            self.read_done.set()
        return out


def test_a_get_that_read_a_key_before_its_remove_does_not_promote_it_back(tmp_path):
    disk = _PausedReadDisk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))  # k written down
    store.flush()
    disk.pause_key = k
    store._locks[0].acquire()  # the reader's promotion (under the top tier's lock) waits for the test
    try:
        reader = threading.Thread(target=store.get, args=(k,), daemon=True)
        reader.start()
        assert disk.read_done.wait(10)  # it read k from disk; next it promotes
        assert store.remove(k)
    finally:
        store._locks[0].release()
    reader.join(10)
    assert not store.contains(k) and store.get(k) is None
    store.close()


def test_an_eviction_racing_a_remove_does_not_write_the_key_back(tmp_path):
    """remove() takes the key's queued write, then an eviction queues the key's newer copy before the
    remove reaches the host tier: that copy must not land on disk after the remove returned."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[_memory(), disk])
    k, slow = hex_key(1), hex_key(2)
    disk.gate(slow)
    store.put(tiny_entry(slow))
    store.put(tiny_entry(k, seed=1))  # slow's write-down holds the worker
    assert disk.entered[slow].wait(10)
    store.put(tiny_entry(hex_key(3)))  # k's version 1 queued
    store.put(tiny_entry(k, seed=2))  # version 2 in the host tier, version 1 still queued
    store._locks[0].acquire()
    try:
        remover = threading.Thread(target=store.remove, args=(k,), daemon=True)
        remover.start()
        deadline = time.monotonic() + 0.5  # before the fix remove took the queued write here
        while k in store._pending and time.monotonic() < deadline:
            time.sleep(0.001)
        store.put(tiny_entry(hex_key(4)))  # evicts version 2: queued
    finally:
        store._locks[0].release()
    remover.join(10)
    disk.release[slow].set()
    store.flush()
    assert not store.contains(k) and store.get(k) is None and not disk.contains(k)
    store.close()


def test_an_eviction_between_removes_steps_does_not_write_the_key_back(tmp_path):
    """The same race, one step later: remove() took the queued writes under the top tier's lock,
    released it, and only then took it again to remove the key from the host tier; an eviction in
    between queued the key again. The top tier's lock is wrapped so that a put runs exactly there."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[_memory(), disk])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    disk.gate(k)  # k's write-down waits until the remove has returned
    lock = _HookedLock(store._locks[0])
    store._locks[0] = lock
    remover = threading.Thread(target=store.remove, args=(k,), daemon=True)
    # the remove's first release of the top tier's lock: a put evicts k meanwhile (and queues it)
    lock.after_release(remover, lambda: _run(lambda: store.put(tiny_entry(hex_key(2)))))
    remover.start()
    remover.join(10)
    disk.release[k].set()
    store.flush()
    assert not store.contains(k) and store.get(k) is None and not disk.contains(k)
    store.close()


def test_a_get_that_reads_the_key_while_remove_walks_down_does_not_promote_it_back(tmp_path):
    """remove() has left the host tier and is about to remove the disk copy when a get reads that copy:
    its promotion must not land in the host tier behind the remove."""
    disk = _PausedReadDisk(tmp_path / "disk", _disk_entries(100))
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(2 * ENTRY_BYTES), disk])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))
    store.put(tiny_entry(hex_key(3)))  # k written down
    store.flush()
    assert not store.tiers[0].contains(k) and disk.contains(k)
    disk.pause_key = k
    reader = threading.Thread(target=store.get, args=(k,), daemon=True)

    def read_first() -> None:  # in the remover, before it removes the disk copy
        reader.start()
        assert disk.read_done.wait(10)

    disk.before_remove[k] = read_first
    assert store.remove(k)
    reader.join(10)
    assert not store.contains(k) and store.get(k) is None
    store.close()


def _version_2_on_disk_over_version_1_in_redis(tmp_path, redis_url, redis_prefix):
    """host (one entry) / disk / Redis: key k at version 2 on disk, its version 1 in Redis below."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk, redis_tier])
    k = hex_key(1)
    redis_tier.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(k, seed=2))
    store.put(tiny_entry(hex_key(2)))  # version 2 written down to disk
    store.flush()
    return store, redis_tier, k


def test_a_get_during_a_remove_never_serves_the_older_copy_the_removal_uncovered(
    tmp_path, redis_url, redis_prefix
):
    """Version 1 in Redis, version 2 on disk above it. remove() walks down: it has removed version 2
    from disk and not yet version 1 from Redis when a get reads Redis: serving version 1 would show
    a version older than one acknowledged before the get began (seen in a stress run)."""
    store, redis_tier, k = _version_2_on_disk_over_version_1_in_redis(tmp_path, redis_url, redis_prefix)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(store.get(k)), daemon=True)

    def read_first() -> None:  # in the remover, before it removes version 1 from Redis
        reader.start()
        assert redis_tier.read_done[k].wait(10)

    redis_tier.before_remove[k] = read_first
    assert store.remove(k)
    reader.join(10)
    assert got and seed_of(got[0]) in (None, 2)
    assert store.get(k) is None
    store.close()


def test_a_get_during_clear_never_serves_an_older_copy_it_uncovered(tmp_path, redis_url, redis_prefix):
    """A get while clear() empties the tiers: when the tiers were cleared top-down, a get between the
    disk and Redis found Redis's version 1 under the version 2 just cleared from disk. Redis now goes
    first; a get while it is cleared may still see version 2 on disk, never version 1."""
    store, redis_tier, k = _version_2_on_disk_over_version_1_in_redis(tmp_path, redis_url, redis_prefix)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(store.get(k)), daemon=True)

    def read_first() -> None:  # in clear, before it removes version 1 from Redis
        reader.start()
        reader.join(2)  # bounded: a get waiting on a lock clear holds finishes after it

    redis_tier.before_remove[k] = read_first
    store.clear()
    reader.join(10)
    assert got and seed_of(got[0]) in (None, 2)
    assert store.get(k) is None and store.keys() == []
    store.close()


def test_a_clear_that_redis_fails_is_an_error_and_keeps_its_shadows(redis_url, redis_prefix):
    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(redis_retry_s=DOWN_S), tiers=[HostTier(ENTRY_BYTES), redis_tier])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))
    store.flush()  # version 1 in Redis
    redis_tier.fail.add(k)
    store.remove(k)  # Redis fails: k shadowed
    assert store.health()["ok"]  # Redis answers again
    redis_tier.fail.add(k)
    with pytest.raises(TierUnavailable, match="redis"):
        store.clear()  # Redis fails again: its copy of k stays, and must stay unserved
    assert store.health()["ok"]  # Redis answers again
    assert store.get(k) is None and not redis_tier.contains(k)
    store.close()


def test_remove_shadows_at_most_the_cap_and_counts_the_rest(redis_url, redis_prefix, monkeypatch):
    """Removes while Redis is down shadow their keys (Redis may hold a copy), bounded like the other
    shadows: past the cap a key is counted as lost instead of growing the set without end."""
    import kvstore.store

    monkeypatch.setattr(kvstore.store, "_MAX_SHADOWED", 2)
    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(redis_retry_s=DOWN_S), tiers=[HostTier(ENTRY_BYTES), redis_tier])
    redis_tier.fail.add(hex_key(0))
    store.put(tiny_entry(hex_key(0)))
    store.put(tiny_entry(hex_key(1)))  # hex_key(0)'s write-down fails: Redis is down, hex_key(0) shadowed
    store.flush()
    for i in (2, 3, 4):
        store.remove(hex_key(i))
    stats = store.stats()
    assert (stats["shadowed"], stats["shadows_lost"]) == (2, 2)
    store.close()


class _HookedLock:
    """A store lock (an RLock) that runs `hook` once, right after `thread` first lets go of it."""

    def __init__(self, lock) -> None:
        self._lock = lock
        self._thread: threading.Thread | None = None
        self._hook: Callable[[], None] | None = None

    def after_release(self, thread: threading.Thread, hook: Callable[[], None]) -> None:
        self._thread, self._hook = thread, hook

    def acquire(self, *args, **kwargs):
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self._lock.release()
        mine = threading.current_thread() is self._thread
        if self._hook is not None and mine and not self._lock._is_owned():  # really released
            hook, self._hook = self._hook, None
            hook()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def _run(fn: Callable[[], None]) -> None:
    """Run `fn` in another thread and wait for it (it takes locks the caller must not hold)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()


def test_a_key_removed_while_redis_stalls_is_not_served_from_redis_later(own_redis_paused):
    pause, resume, url = own_redis_paused
    redis_tier = RedisTier(url, 1 << 20, "kvfuse-test-remove:", timeout_s=0.3)
    config = StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S, redis_timeout_s=0.3)
    store = TieredStore(config, tiers=[HostTier(ENTRY_BYTES), redis_tier])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))
    store.flush()
    assert redis_tier.contains(k)
    pause()
    store.remove(k)  # Redis does not answer: its copy stays there for now
    resume()
    assert store.health()["ok"]  # Redis answers again
    assert store.get(k) is None and store.lookup([k]) == 0
    assert not redis_tier.contains(k)  # and the copy is gone once Redis answered
    store.close()


def test_a_remove_waiting_on_redis_holds_up_no_put_and_a_put_meanwhile_lands_after_it(own_redis_paused):
    """remove() held the top tier's lock across its Redis DEL: while Redis was slow to answer (here
    stalled), every put waited for it, up to redis_timeout_s. It lets go of it before the DEL, and a
    put of the same key meanwhile is written to Redis only after the DEL (it holds that tier's lock),
    so the new version stays there: a put after the remove."""
    pause, resume, url = own_redis_paused
    redis_tier = _Redis(url, 1 << 20, "kvfuse-test-remove:", timeout_s=30)
    config = StoreConfig(write_through=True, redis_timeout_s=30)
    store = TieredStore(config, tiers=[HostTier(4 * ENTRY_BYTES), redis_tier])
    k = hex_key(1)
    redis_tier.put(tiny_entry(k, seed=1))  # as another engine left it
    at_redis = threading.Event()
    redis_tier.before_remove[k] = at_redis.set
    pause()
    try:
        remover = threading.Thread(target=store.remove, args=(k,), daemon=True)
        remover.start()
        assert at_redis.wait(10)  # the remove's DEL is on its way to the stalled Redis
        putter = threading.Thread(
            target=lambda: (store.put(tiny_entry(k, seed=2)), store.put(tiny_entry(hex_key(2)))), daemon=True
        )
        putter.start()
        putter.join(10)
        put_while_stalled = not putter.is_alive() and remover.is_alive()
    finally:
        resume()
    remover.join(10)
    putter.join(10)
    assert put_while_stalled and not remover.is_alive()
    store.flush()
    assert seed_of(store.get(k)) == 2 and seed_of(redis_tier.get(k)) == 2
    store.close()


# ---- f. a put keeps the key's shadow until Redis holds the new copy ------------------------------------


def test_a_get_past_the_top_tier_when_a_put_lands_never_reads_the_shadowed_copy(redis_url, redis_prefix):
    """Version 2's write-down to Redis was dropped (Redis holds version 1, shadowed). A get misses the
    host tier; version 3 is put into it; the get goes on to Redis: it must not serve version 1 (the
    put cleared the shadow at once, before Redis had anything newer)."""
    host = _Host(ENTRY_BYTES)
    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S), tiers=[host, redis_tier])
    k = hex_key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))
    store.flush()  # version 1 in Redis
    store.put(tiny_entry(k, seed=2))
    redis_tier.fail.add(k)
    store.put(tiny_entry(hex_key(3)))  # version 2's write-down fails
    store.flush()
    assert store.health()["ok"] and redis_tier.contains(k)  # back, still holding version 1
    release = host.release[k] = threading.Event()
    got: list = []
    reader = threading.Thread(target=lambda: got.append(store.get(k)), daemon=True)
    reader.start()
    assert host.entered[k].wait(10)  # the reader missed the host tier
    store.put(tiny_entry(k, seed=3))
    release.set()
    reader.join(10)
    assert got and seed_of(got[0]) in (None, 3)
    assert seed_of(store.get(k)) == 3
    store.close()


def test_a_restart_keeps_the_shadows_so_redis_never_serves_what_was_dropped_or_removed(
    tmp_path, redis_url, redis_prefix
):
    """Redis holds version 1 of two keys; one's version 2 is dropped on its way there, the other is
    removed, both while Redis fails: after close and a restart (Redis answering again) neither older
    copy is served, and both are gone from Redis once asked for."""

    def open_store(redis_tier: RedisTier) -> TieredStore:
        disk = _Disk(tmp_path / "disk", _disk_entries(1))  # too small for version 2: it goes to Redis
        return TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk, redis_tier])

    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = open_store(redis_tier)
    dropped, removed = hex_key(1), hex_key(2)
    for k in (dropped, removed):
        redis_tier.put(tiny_entry(k, seed=1))  # as another engine sharing this Redis left them
    redis_tier.fail.add(dropped)
    store.put(tiny_entry(dropped, tokens=8, seed=2))  # too large for host and disk; Redis fails it
    store.flush()
    redis_tier.fail.add(removed)
    store.remove(removed)  # Redis fails: its copy stays there
    store.close()
    assert redis_tier.contains(dropped) and redis_tier.contains(removed)  # the older copies, unserved
    again_redis = RedisTier(redis_url, 1 << 20, redis_prefix)
    again = open_store(again_redis)
    assert again.lookup([dropped]) == 0 and again.lookup([removed]) == 0
    assert again.get(dropped) is None and again.get(removed) is None
    assert not again_redis.contains(dropped) and not again_redis.contains(removed)
    again.close()


# ---- g. slow writes are queued for the first slow tier even while it is down ---------------------------


def test_a_write_queued_while_the_disk_was_down_never_lands_below_an_older_one(
    tmp_path, redis_url, redis_prefix
):
    """k's version 1 is queued for the disk; the disk is marked down; version 2 is evicted and was
    queued for Redis (skipping the disk); the disk comes back before the worker reaches version 1,
    which then landed on disk, above version 2 in Redis.

    The disk stays down until the test ends the outage (its retry time is moved to now, as if
    redis_retry_s had passed): with a 1 s retry time on a loaded machine the disk could come back
    before version 2 was evicted (the race was then not tested) or before the test checked it was
    down (a failure)."""
    disk = _Disk(tmp_path / "disk", _disk_entries(100))
    redis_tier = _Redis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(redis_retry_s=DOWN_S), tiers=[_memory(), disk, redis_tier])
    faulty, held, k = hex_key(1), hex_key(2), hex_key(3)
    disk.gate(faulty)
    disk.fail.add(faulty)
    redis_tier.release[held] = threading.Event()
    store.put(tiny_entry(faulty))
    store.put(tiny_entry(held))  # faulty's write: the worker waits inside it
    assert disk.entered[faulty].wait(10)
    store.put(tiny_entry(k, seed=1))  # held queued for the disk
    store.put(tiny_entry(hex_key(4)))  # k's version 1 queued for the disk
    disk.release[faulty].set()  # faulty's write fails: the disk is marked down
    assert redis_tier.entered[held].wait(10)  # the worker writes held to Redis instead, and waits
    assert not store._usable(disk)
    store.put(tiny_entry(k, seed=2))
    store.put(tiny_entry(hex_key(5)))  # version 2 evicted while the disk is down
    _retry_time_passes(store, disk)
    assert store._usable(disk)
    redis_tier.release[held].set()
    store.flush()
    assert seed_of(store.get(k)) == 2
    store.close()


def _retry_time_passes(store: TieredStore, tier) -> None:
    """The retry time of a tier marked down is reached now (as once redis_retry_s has passed): the
    next call tries it again."""
    _, error = store._down[tier.name]
    store._down[tier.name] = (time.monotonic(), error)


# ---- cachestat: a call that fails for good is not repeated on every read ------------------------------


class _FailingCachestat:
    """libc with cachestat failing with `err` (as under a seccomp filter that does not know it)."""

    def __init__(self, libc, err: int) -> None:
        self._libc, self._err, self.calls = libc, err, 0

    def syscall(self, *args):
        self.calls += 1
        import ctypes

        ctypes.set_errno(self._err)
        return -1

    def __getattr__(self, name):
        return getattr(self._libc, name)


@pytest.mark.parametrize(("err", "calls"), [(errno.EPERM, 1), (errno.EOPNOTSUPP, 1), (errno.EINTR, 2)])
def test_cachestat_is_given_up_after_a_lasting_error_and_reads_stay_exact(tmp_path, monkeypatch, err, calls):
    if disk_module._LIBC is None:
        pytest.skip("no libc (not Linux)")
    libc = _FailingCachestat(disk_module._LIBC, err)
    monkeypatch.setattr(disk_module, "_LIBC", libc)
    monkeypatch.setattr(disk_module, "_cachestat_works", True)
    disk = DiskTier(tmp_path, 1 << 20, read_pool_bytes=1 << 20)
    entry = tiny_entry(hex_key(1), seed=7)
    disk.put(entry)
    for _ in range(2):
        assert torch.equal(disk.get(entry.key).kv, entry.kv)  # mincore answers instead
    assert libc.calls == calls
