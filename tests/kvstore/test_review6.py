"""The sixth review's findings (review of kv3 at e64a2f9): one test each, each of which failed before its fix.

Real tiers (files, the real Redis) with faults injected by subclasses or by wrapping one client call:
a write-down that waits for the test at a known point, a DEL that drops the connection once, a Redis
that is down until the test says otherwise.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable

import msgpack
import pytest
import redis
from kvstore_helpers import ENTRY_BYTES, assert_redis_consistent, hex_key, seed_of, tiny_entry

import kvstore.keyfile as keyfile
import kvstore.store as store_module
from kvstore import StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import DiskTier, HostTier, RedisTier, TierUnavailable
from kvstore.tiers.host import MemoryTier

DOWN_S = 60.0  # redis_retry_s where a tier must stay down until the test says otherwise


def _disk_entries(n: int) -> int:
    return n * encoded_nbytes(tiny_entry(hex_key(0)))


def _until(done: Callable[[], bool], what: str) -> None:
    """Wait until `done()` (a state another thread reaches), failing only if it never comes."""
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


def _waiting_on_a_condition(thread: threading.Thread) -> bool:
    """Whether `thread` is blocked in threading.Condition.wait (its innermost Python frame)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return (
        frame is not None
        and frame.f_code.co_name == "wait"
        and frame.f_code.co_filename == threading.__file__
    )


def _fail_next_delete(tier: RedisTier) -> None:
    """The tier's next DEL drops the connection (before Redis sees it)."""
    real = tier.client.delete

    def delete(*args, **kwargs):
        tier.client.delete = real
        raise redis.exceptions.ConnectionError("injected: connection dropped during DEL")

    tier.client.delete = delete


# ---- 1. a write-down under way when remove() runs never lands after it ---------------------------------


class _LandingDisk(DiskTier):
    """A real disk tier. The write of `key` waits at entry_size (the worker has passed its "still
    pending?" check) until `go`; once its file is on disk, it starts a get of the key and waits until
    that get has read the disk (the window before the worker could undo the write)."""

    def __init__(self, *args, key: str, **kwargs) -> None:
        super().__init__(*args, read_pool_bytes=1 << 20, **kwargs)
        self.key = key
        self.entered, self.go, self.read_done = threading.Event(), threading.Event(), threading.Event()
        self.store: TieredStore | None = None
        self.got: list = []
        self.getters: list[threading.Thread] = []

    def entry_size(self, entry):
        if entry.key == self.key and not self.go.is_set():
            self.entered.set()
            self.go.wait(10)
        return super().entry_size(entry)

    def put(self, entry) -> None:
        super().put(entry)
        if entry.key == self.key and self.store is not None:
            store = self.store
            t = threading.Thread(target=lambda: self.got.append(store.get(self.key)), daemon=True)
            self.getters.append(t)
            t.start()
            self.read_done.wait(10)

    def get(self, key: str):
        out = super().get(key)
        if key == self.key:
            self.read_done.set()
        return out


def test_a_write_down_under_way_during_remove_is_never_served_or_persisted_after_it(tmp_path):
    """The worker took K's queued write and checked K was still pending; remove(K) then took the queued
    write and found no disk copy yet; the write landed; a get that began after that read the disk copy
    and promoted it to the top tier; the worker's undo removed only the disk copy. The removed K was
    served from then on, and close() wrote it back to disk for the next start."""
    k = hex_key(1)
    disk = _LandingDisk(tmp_path / "disk", _disk_entries(100), key=k)
    store = TieredStore(StoreConfig(lease_wait_s=0.01), tiers=[MemoryTier(ENTRY_BYTES), disk])
    disk.store = store
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(hex_key(2)))  # evicts K: its write-down is queued; the worker waits in entry_size
    assert disk.entered.wait(10)
    remover = threading.Thread(target=store.remove, args=(k,), daemon=True)
    remover.start()
    # let the write land only once remove() is done with it: returned, or waiting for the write
    _until(lambda: not remover.is_alive() or _waiting_on_a_condition(remover), "remove() took K's write")
    disk.go.set()
    remover.join(10)
    assert not remover.is_alive()
    store.flush()
    for t in disk.getters:
        t.join(10)
    assert disk.getters and disk.read_done.is_set()  # the window was really there
    assert all(seed_of(got) is None for got in disk.got)
    assert store.get(k) is None and store.lookup([k]) == 0
    assert not store.tiers[0].contains(k) and not disk.contains(k)
    store.close()
    again = DiskTier(tmp_path / "disk", _disk_entries(100), read_pool_bytes=1 << 20)
    assert not again.contains(k)  # nor written back at close for the next start


# ---- 3. a key file the store writes is always one it can read back ------------------------------------


def test_write_keys_refuses_a_file_read_keys_would_refuse_and_keeps_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setattr(keyfile, "MAX_FILE_BYTES", 4096)
    path = tmp_path / "keys.msgpack"
    keyfile.write_keys(path, ["a", "b"])
    with pytest.raises(OSError) as e:
        keyfile.write_keys(path, [f"{i:0200d}" for i in range(100)])  # ~20 KB
    assert e.value.errno == errno.EFBIG and str(path) in str(e.value)
    assert keyfile.read_keys(path) == ["a", "b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_full_shadow_set_of_the_longest_service_keys_fits_a_key_file():
    """The shadow cap times the service's longest key (200 chars) in msgpack: a key file must hold
    it (64 MiB held a full set of 62-char keys only, ~330k of 200 chars)."""
    per_key = len(msgpack.packb(["k" * 200])) - 1  # minus the 1-byte array header
    assert store_module._MAX_SHADOWED * per_key + 5 <= keyfile.MAX_FILE_BYTES  # + an array32 header


def test_a_store_restarts_after_closing_with_more_shadows_than_a_key_file_holds(tmp_path, monkeypatch):
    """Scaled down 1024x (cap and file limit): removes of 200-char keys while Redis is down, close,
    reopen. The reopen raised "unreadable shadowed.msgpack; fix or delete it" on a file close wrote."""
    monkeypatch.setattr(store_module, "_MAX_SHADOWED", 1 << 10)
    monkeypatch.setattr(keyfile, "MAX_FILE_BYTES", 64 << 10)

    def open_store() -> TieredStore:
        tiers = [
            HostTier(ENTRY_BYTES),
            DiskTier(tmp_path / "disk", _disk_entries(4), read_pool_bytes=1 << 20),
            RedisTier("redis://127.0.0.1:1/0", 1 << 20, "kvfuse-test-unused:", timeout_s=0.2),  # refused
        ]
        return TieredStore(StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S), tiers=tiers)

    store = open_store()
    for i in range(1 << 10):
        store.remove(f"{i:0200d}")
    assert store.stats()["shadowed"] == 1 << 10
    store.close()
    open_store().close()


# ---- 4. a failed DEL leaves no data key that is readable but uncounted ---------------------------------


def test_a_remove_whose_del_fails_leaves_the_data_counted(redis_url, redis_prefix):
    tier = RedisTier(redis_url, 1 << 20, redis_prefix)
    k = hex_key(1)
    tier.put(tiny_entry(k, seed=1))
    _fail_next_delete(tier)
    with pytest.raises(TierUnavailable):
        tier.remove(k)
    assert_redis_consistent(
        tier
    )  # released before the DEL: readable, out of the LRU and the bytes, never evicted
    assert tier.remove(k) > 0 and not tier.contains(k)  # a later remove still finds and frees it
    assert_redis_consistent(tier)


def test_an_eviction_from_redis_whose_del_fails_keeps_the_shared_budget_exact(redis_url, redis_prefix):
    size = encoded_nbytes(tiny_entry(hex_key(0)))
    tier = RedisTier(redis_url, 2 * size + 10, redis_prefix)  # room for two entries
    store = TieredStore(
        StoreConfig(lease_wait_s=0.01, redis_retry_s=0.01), tiers=[HostTier(ENTRY_BYTES), tier]
    )
    for i in range(3):
        store.put(tiny_entry(hex_key(10 + i)))
    store.flush()  # two of them in Redis
    _fail_next_delete(tier)
    store.put(
        tiny_entry(hex_key(13))
    )  # hex_key(12)'s write-down evicts hex_key(10) from Redis: its DEL fails
    store.flush()
    assert_redis_consistent(tier)
    assert tier.usage().bytes <= tier.capacity_bytes
    store.close()


# ---- 7. key files are durable ------------------------------------------------------------------------


def test_a_key_file_is_fsynced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    """write_keys (removed.msgpack, shadowed.msgpack) renamed an unsynced temp file: after a power cut
    the file could be empty (the next start refuses it) or the rename lost (a removal forgotten)."""
    path = tmp_path / "keys.msgpack"
    synced: list[tuple[str, bool]] = []  # (what the fd names, whether `path` holds the new keys yet)
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), path.exists()))

    monkeypatch.setattr(os, "fsync", fsync)
    keyfile.write_keys(path, ["a", "b"])
    monkeypatch.undo()
    assert len(synced) == 2, synced
    (file_name, renamed_before_file_sync), (folder, renamed_before_dir_sync) = synced
    assert os.path.basename(file_name).startswith(".tmp-keys.msgpack") and not renamed_before_file_sync
    assert folder == str(tmp_path) and renamed_before_dir_sync
    assert keyfile.read_keys(path) == ["a", "b"]


def test_a_key_file_temp_left_by_a_crash_is_deleted_at_start(tmp_path):
    """Only the subfolders' temp files were cleaned: one of removed.msgpack or shadowed.msgpack (in the
    root) stayed forever."""
    root = tmp_path / "disk"
    DiskTier(root, _disk_entries(4), read_pool_bytes=1 << 20).close()
    crashed = root / ".tmp-removed.msgpack-0123abcd"
    crashed.write_bytes(b"\x92")  # half a msgpack list
    keep = root / "notes.txt"  # not ours: left alone
    keep.write_text("x")
    DiskTier(root, _disk_entries(4), read_pool_bytes=1 << 20).close()
    assert not crashed.exists() and keep.exists()


# ---- 6. clear() with Redis down never lets a cleared key come back -------------------------------------


class _DownRedis(RedisTier):
    """The real Redis tier; while `down`, every call fails as a dropped connection would."""

    down = False

    def _io(self, what: str):
        if self.down:
            raise TierUnavailable(f"injected: Redis at {self.url} down during {what}")
        return super()._io(what)


def test_clear_with_redis_down_refuses_and_a_cleared_key_never_comes_back(redis_url, redis_prefix):
    """clear() emptied the shadows, then skipped Redis (down): once Redis answered, the cleared key was
    served from it again."""
    redis_tier = _DownRedis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(
        StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S), tiers=[HostTier(ENTRY_BYTES), redis_tier]
    )
    k, top = hex_key(1), hex_key(2)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(top))
    store.flush()  # k in Redis, top in the host tier
    redis_tier.down = True
    assert store.get(hex_key(3)) is None  # Redis fails once: marked down
    with pytest.raises(TierUnavailable, match="redis"):
        store.clear()
    assert store.tiers[0].contains(top)  # nothing cleared
    redis_tier.down = False
    with pytest.raises(TierUnavailable, match="redis"):
        store.clear()  # still marked down: refused again, not skipped
    store._down.clear()  # the retry time passed (not waited for: DOWN_S)
    store.clear()
    assert store.get(k) is None and store.get(top) is None and store.lookup([k]) == 0
    assert not redis_tier.contains(k) and redis_tier.keys() == []
    store.close()


def test_clear_whose_redis_call_fails_clears_no_local_tier(redis_url, redis_prefix):
    redis_tier = _DownRedis(redis_url, 1 << 20, redis_prefix)
    store = TieredStore(
        StoreConfig(lease_wait_s=0.01, redis_retry_s=DOWN_S), tiers=[HostTier(ENTRY_BYTES), redis_tier]
    )
    store.put(tiny_entry(hex_key(1)))
    redis_tier.down = True  # not yet marked down: the clear itself fails
    with pytest.raises(TierUnavailable, match="redis"):
        store.clear()
    assert store.tiers[0].contains(hex_key(1)) and not store.health()["tiers"]["redis"]["ok"]
    redis_tier.down = False
    store.close()


# ---- 2. a shadow goes once the store itself removed the key from Redis ---------------------------------


def test_an_eviction_from_redis_drops_the_shadow_of_the_key_it_removed(redis_url, redis_prefix):
    """Shadows only went when their key was read or written again: evicted from Redis, a shadowed key
    stayed shadowed for good (saved across restarts), until the cap was reached and a later outage's
    shadow was lost (a stale read)."""
    size = encoded_nbytes(tiny_entry(hex_key(0)))
    redis_tier = _DownRedis(redis_url, 2 * size + 10, redis_prefix)  # room for two entries
    store = TieredStore(
        StoreConfig(lease_wait_s=0.01, redis_retry_s=0.01), tiers=[HostTier(ENTRY_BYTES), redis_tier]
    )
    k = hex_key(1)
    redis_tier.put(tiny_entry(k, seed=1))  # as another engine left it
    redis_tier.down = True
    store.remove(k)  # Redis down: its copy stays, shadowed
    redis_tier.down = False
    assert store.health()["ok"]  # answers again
    assert store.stats()["shadowed"] == 1 and redis_tier.contains(k)
    for i in range(3):
        store.put(tiny_entry(hex_key(10 + i)))  # two write-downs fill Redis: k, the LRU, is evicted
    store.flush()
    assert not redis_tier.contains(k)
    assert store.stats()["shadowed"] == 0
    store.close()
