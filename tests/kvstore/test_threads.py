"""16 threads putting and getting at once lose nothing and corrupt nothing."""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest
import torch
from kvstore_helpers import ENTRY_BYTES, tiny_entry

from kvstore import StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import DiskTier, HostTier, RedisTier

THREADS, PER_THREAD = 16, 25


def _key(t: int, i: int) -> str:
    return f"{t:04x}{i:028x}"


def _seed(t: int, i: int) -> int:
    return t * 1000 + i


def _hammer(store: TieredStore, errors: list[str], copy: bool = True) -> None:
    """Each thread puts its own keys and shared ones and reads random keys. With copy=False the reads
    are zero-copy views of the host pool, kept across the thread's next puts (which evict): they must
    still hold the right values when checked."""

    def work(t: int) -> None:
        rng = random.Random(t)
        held = None
        try:
            for i in range(PER_THREAD):
                store.put(tiny_entry(_key(t, i), seed=_seed(t, i)))
                store.put(tiny_entry(_key(99, i % 5), seed=_seed(99, i % 5)))  # contended keys
                if held is not None and not torch.equal(held[1].kv, tiny_entry("x", seed=held[0]).kv):
                    errors.append(f"a held entry changed under its reader (seed {held[0]})")
                u, j = rng.randrange(THREADS), rng.randrange(PER_THREAD)
                got = store.get(_key(u, j), copy=copy)
                if got is not None and not torch.equal(got.kv, tiny_entry("x", seed=_seed(u, j)).kv):
                    errors.append(f"wrong data for {_key(u, j)}")
                held = None if got is None else (_seed(u, j), got)
        except Exception as e:  # surfaced by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _check_all(store: TieredStore) -> None:
    store.flush()
    for t in [*range(THREADS), 99]:
        for i in range(PER_THREAD if t != 99 else 5):
            got = store.get(_key(t, i))
            assert got is not None, f"lost {_key(t, i)}"
            assert torch.equal(got.kv, tiny_entry("x", seed=_seed(t, i)).kv)
    for tier in store.tiers:
        assert tier.usage().bytes <= tier.capacity_bytes


def test_sixteen_threads_host_and_disk(tmp_path):
    total = THREADS * PER_THREAD + 5
    disk = DiskTier(tmp_path, total * encoded_nbytes(tiny_entry("0" * 32)))
    store = TieredStore(StoreConfig(write_queue=8), tiers=[HostTier(40 * ENTRY_BYTES), disk])
    errors: list[str] = []
    _hammer(store, errors)
    assert errors == []
    _check_all(store)
    assert store.stats()["tiers"]["host"]["demotions"] > 0
    store.close()


def test_sixteen_threads_holding_zero_copy_reads(tmp_path):
    total = THREADS * PER_THREAD + 5
    disk = DiskTier(tmp_path, total * encoded_nbytes(tiny_entry("0" * 32)))
    config = StoreConfig(write_queue=8, lease_wait_s=0.05)
    store = TieredStore(config, tiers=[HostTier(40 * ENTRY_BYTES), disk])
    errors: list[str] = []
    _hammer(store, errors, copy=False)
    assert errors == []
    _check_all(store)
    store.close()


def test_sixteen_threads_host_and_redis(redis_url, redis_prefix):
    total = THREADS * PER_THREAD + 5
    redis_tier = RedisTier(redis_url, total * encoded_nbytes(tiny_entry("0" * 32)), redis_prefix)
    store = TieredStore(StoreConfig(write_queue=8), tiers=[HostTier(40 * ENTRY_BYTES), redis_tier])
    errors: list[str] = []
    _hammer(store, errors)
    assert errors == []
    _check_all(store)
    store.close()


# ---- a newer acknowledged put is never replaced by an older copy (scenarios from a review) -------------


def _version(entry) -> int | None:
    """Which seed made this tiny entry (the version the test put), or None."""
    if entry is None:
        return None
    tokens = entry.kv.shape[2]
    return next(s for s in range(100) if torch.equal(tiny_entry(entry.key, tokens, seed=s).kv, entry.kv))


def _host_disk(tmp_path, host_entries: int) -> TieredStore:
    disk = DiskTier(tmp_path / "disk", 1000 * encoded_nbytes(tiny_entry("0" * 32)))
    return TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(host_entries * ENTRY_BYTES), disk])


def test_a_get_that_read_an_old_copy_does_not_promote_it_over_a_newer_put(tmp_path):
    store = _host_disk(tmp_path, 2)
    key = _key(0, 1)
    store.put(tiny_entry(key, seed=1))
    store.put(tiny_entry(_key(0, 2)))
    store.put(tiny_entry(_key(0, 3)))
    store.flush()  # version 1 on disk only
    store._locks[0].acquire()  # the reader's disk read is done; it waits to promote (as behind a put)
    reader = threading.Thread(target=store.get, args=(key,))
    reader.start()
    reader.join(0.2)
    store.put(tiny_entry(key, seed=2))  # acknowledged while the reader holds version 1
    store._locks[0].release()
    reader.join()
    store.flush()
    assert _version(store.get(key)) == 2
    store.close()


def test_puts_racing_evictions_of_the_same_key_keep_the_last_version(tmp_path):
    for _ in range(3):
        store = _host_disk(tmp_path / str(random.random()), 2)
        key, stop = _key(0, 1), threading.Event()

        def filler(store: TieredStore, stop: threading.Event, t: int) -> None:
            i = 0
            while not stop.is_set():
                store.put(tiny_entry(_key(t + 1, i % 50)))
                i += 1

        threads = [threading.Thread(target=filler, args=(store, stop, t)) for t in range(3)]
        for th in threads:
            th.start()
        for v in range(200):
            store.put(tiny_entry(key, seed=1 + v % 98))
        store.put(tiny_entry(key, seed=99))  # the last acknowledged version
        stop.set()
        for th in threads:
            th.join()
        for i in range(3):  # push it out of the host tier
            store.put(tiny_entry(_key(9, i)))
        store.flush()
        assert _version(store.get(key)) == 99
        store.close()


def test_redis_unreachable_when_a_newer_copy_is_dropped_never_serves_its_older_one(own_redis_paused):
    pause, resume, url = own_redis_paused
    redis_tier = RedisTier(url, 1 << 20, "kvfuse-test-shadow:", timeout_s=0.3)
    config = StoreConfig(lease_wait_s=0.01, redis_retry_s=0.3, redis_timeout_s=0.3)
    store = TieredStore(config, tiers=[HostTier(2 * ENTRY_BYTES), redis_tier])
    key = _key(0, 1)
    for k, seed in ((key, 1), (_key(0, 2), 0), (_key(0, 3), 0)):
        store.put(tiny_entry(k, seed=seed))
    store.flush()  # version 1 in Redis
    store.put(tiny_entry(key, seed=2))
    pause()  # Redis stalls: version 2's demotion is dropped, version 1 stays in Redis
    store.put(tiny_entry(_key(0, 4)))
    store.put(tiny_entry(_key(0, 5)))
    store.flush()
    resume()
    import time

    time.sleep(0.4)  # past the retry time
    assert store.get(key) is None  # a miss, never version 1
    assert not redis_tier.contains(key)  # and the old copy is gone from Redis
    store.close()


def test_write_through_reaches_every_slow_tier(tmp_path, redis_url, redis_prefix):
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    redis_tier = RedisTier(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(StoreConfig(write_through=True), tiers=[HostTier(8 * ENTRY_BYTES), disk, redis_tier])
    key = _key(0, 1)
    for seed in (1, 2):
        for copy in (True, False):
            store.put(tiny_entry(key, seed=seed), copy=copy)
            store.flush()
            assert _version(disk.get(key)) == seed and _version(redis_tier.get(key)) == seed
    store.close()


class _GateDisk(DiskTier):
    """A disk tier whose write of `gate_key` waits for `gate` (a slow write the worker is busy with)."""

    gate_key: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()

    def entry_size(self, entry):
        if entry.key == self.gate_key:
            self.entered.set()
            self.gate.wait(10)
        return super().entry_size(entry)


def test_a_removed_key_is_not_written_back_by_its_queued_demotion(tmp_path):
    disk = _GateDisk(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk])
    key, slow = _key(0, 1), _key(0, 2)
    disk.gate_key = slow
    store.put(tiny_entry(slow))
    store.put(tiny_entry(key, seed=1))  # the slow key's demotion keeps the worker busy
    assert disk.entered.wait(10)
    store.put(tiny_entry(_key(0, 3)))  # the key's demotion queued behind it
    assert store.remove(key) and not store.contains(key)
    disk.gate.set()
    store.flush()
    assert not store.contains(key) and store.get(key) is None
    store.close()


def test_a_write_down_removes_an_older_copy_it_cannot_replace(tmp_path):
    """The version evicted from the top tier does not fit the middle tier, which holds the older one:
    it lands on disk, and the older copy may not stay above it."""
    from kvstore.tiers.host import MemoryTier

    big = tiny_entry(_key(0, 1), tokens=8, seed=2)
    top, middle = MemoryTier(2 * big.nbytes), MemoryTier(ENTRY_BYTES + 8)
    middle.name = "middle"
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[top, middle, disk])
    store.put(tiny_entry(big.key, seed=1))
    store.put(tiny_entry(_key(0, 5), tokens=8))
    store.put(tiny_entry(_key(0, 6), tokens=8))
    store.flush()
    assert middle.contains(big.key)  # version 1, pushed down
    store.put(big)  # version 2, larger than the middle tier
    store.put(tiny_entry(_key(0, 7), tokens=8))
    store.put(tiny_entry(_key(0, 8), tokens=8))
    store.flush()
    assert _version(store.get(big.key)) == 2 and not middle.contains(big.key)
    store.close()


def test_a_key_removed_while_its_write_is_under_way_stays_removed(tmp_path):
    disk = _GateDisk(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[HostTier(ENTRY_BYTES), disk])
    key = _key(0, 1)
    disk.gate_key = key
    store.put(tiny_entry(key, seed=1))
    store.put(tiny_entry(_key(0, 2)))  # the key's demotion: the worker is inside its write
    assert disk.entered.wait(10)
    assert store.remove(key)
    disk.gate.set()
    store.flush()
    assert not store.contains(key) and store.get(key) is None
    store.close()


def test_an_eviction_does_not_skip_its_write_down_while_an_older_write_of_the_key_is_queued(tmp_path):
    """Bytes A on disk (checksum known), then B put and its write-down held in the queue, then A put
    again (as a server's PUT: frozen, its checksum known) and evicted: the disk still says A, but B's
    queued write lands after this eviction, so skipping A's write would leave B."""
    from kvstore.format import decode, encode_bytes
    from kvstore.tiers.host import MemoryTier  # keeps the entry itself (a pool would copy it)

    disk = _GateDisk(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[MemoryTier(ENTRY_BYTES), disk])
    key = _key(0, 1)

    def put_a():
        store.put(decode(bytearray(encode_bytes(tiny_entry(key, seed=1))), frozen=True), copy=False)

    put_a()
    store.put(tiny_entry(_key(0, 2)))  # A written down
    store.flush()
    assert disk.checksum_of(key) is not None
    disk.gate_key = key
    store.put(tiny_entry(key, seed=2))  # B
    store.put(tiny_entry(_key(0, 3)))  # B's write-down: the worker waits inside it
    assert disk.entered.wait(10)
    put_a()  # A again: the same checksum as the disk's copy
    assert disk.checksum_of(key) == store.tiers[0].get(key)._checksum[1]
    store.put(tiny_entry(_key(0, 4)))  # A evicted while B's write is still under way
    disk.gate.set()
    store.flush()
    assert _version(store.get(key)) == 1
    store.close()


def test_a_put_under_way_when_close_starts_is_written_and_later_puts_are_refused(tmp_path):
    """close() waits for a put it overlaps (its eviction's write-down was queued after the worker
    stopped and was lost), and a put after close is a clear error."""
    import pytest

    def open_store():
        disk = DiskTier(tmp_path / "disk", 1 << 20)
        return TieredStore(StoreConfig(persist_on_close=False), tiers=[HostTier(ENTRY_BYTES), disk])

    store = open_store()
    victim = _key(0, 1)
    store.put(tiny_entry(victim, seed=3))
    store._pending_lock.acquire()  # the next put's eviction stops just before queueing its write-down
    putter = threading.Thread(target=store.put, args=(tiny_entry(_key(0, 2)),))
    putter.start()
    deadline = time.monotonic() + 10
    while not store._puts_active and time.monotonic() < deadline:  # the put has begun
        time.sleep(0.001)
    putter.join(0.2)  # and reaches the queue (it waits for the lock there)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.3)  # (before the fix close finished here, and the worker with it)
    store._pending_lock.release()
    putter.join(10)
    closer.join(10)
    assert not putter.is_alive() and not closer.is_alive()
    again = open_store()
    assert _version(again.get(victim)) == 3
    again.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.put(tiny_entry(_key(0, 3)))


def test_a_write_down_queued_once_the_worker_stopped_is_written_by_its_caller(tmp_path):
    """The other half of that race: a get's promotion may evict (and queue) while close stops the
    worker; such a write is done by the caller, after the worker's last one."""
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(), tiers=[HostTier(ENTRY_BYTES), disk])
    store.close()
    store._enqueue(1, tiny_entry(_key(0, 1), seed=4))  # as a caller that saw the worker running
    assert _version(disk.get(_key(0, 1))) == 4


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (real ENOSPC); skipped where mounting is refused."""
    import subprocess

    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill(path) -> None:
    """Write `path` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_disk_full_of_an_older_copy_never_serves_it_after_a_newer_write_failed(small_fs):
    """ENOSPC: the newer version's write-down fails and the disk tier is marked down; the older copy
    it holds must not be served when the tier is back. Also while it is down, a newer version that
    skips it must remove its older copy."""
    disk = DiskTier(small_fs / "disk", 1 << 20)  # a byte budget the file system cannot give
    config = StoreConfig(lease_wait_s=0.01, redis_retry_s=0.3)
    store = TieredStore(config, tiers=[HostTier(ENTRY_BYTES), disk])
    k, j = _key(0, 1), _key(0, 2)
    for key in (k, j, _key(0, 3)):
        store.put(tiny_entry(key, seed=1))  # version 1 of k and j written down
    store.flush()
    assert disk.contains(k) and disk.contains(j)
    store.remove(_key(0, 3))  # the host tier is empty
    _fill(small_fs / "filler")
    store.put(tiny_entry(k, seed=2))
    store.put(tiny_entry(_key(0, 4)))  # k's version 2 evicted: its write fails (ENOSPC)
    store.flush()
    assert not store.health()["tiers"]["disk"]["ok"]
    store.put(tiny_entry(j, seed=2))
    store.put(tiny_entry(_key(0, 5)))  # j's version 2 evicted while the disk is down: dropped
    store.flush()
    (small_fs / "filler").unlink()
    time.sleep(0.35)  # past redis_retry_s: the disk tier is used again
    assert store.get(k) is None and store.get(j) is None  # a miss, never version 1
    assert not list((small_fs / "disk").rglob(".tmp-*"))  # the failed write left no temp file
    store.put(tiny_entry(k, seed=3))
    store.put(tiny_entry(_key(0, 6)))
    store.flush()
    assert _version(store.get(k)) == 3 and store.health()["tiers"]["disk"]["ok"]
    store.close()
