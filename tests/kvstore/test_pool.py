"""The host tier's byte pool: blocks, leases that keep evicted memory from being reused, fragmentation."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from kvstore_helpers import ENTRY_BYTES, SMOL, tiny_entry

from kvstore import Entry, StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import DiskTier, HostTier, TierFull
from kvstore.tiers.pool import BytePool


def _key(i: int) -> str:
    return f"{i:032x}"


def test_blocks_are_reused_by_size_and_coalesced():
    pool = BytePool(64)
    a, b, c = pool.alloc(16), pool.alloc(16), pool.alloc(16)
    assert (a, b, c) == (0, 16, 32) and pool.used == 48
    assert pool.alloc(24) is None  # 16 left at the top
    pool.free(b)
    assert pool.alloc(16) == b  # exact size reused
    pool.free(a)
    pool.free(b)  # a and b merge into one 32-byte block
    assert pool.alloc(32) == 0 and pool.used == 48
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(8)


def test_a_leased_block_is_not_reused_until_released():
    pool = BytePool(32)
    off = pool.alloc(32)
    pool.view(off).fill_(7)
    held = pool.lease(off)[4:8]  # a view of the lease holds it too
    pool.free(off)
    assert pool.retired == 32 and pool.alloc(32) is None
    assert torch.all(held == 7)
    del held
    assert pool.retired == 0 and pool.alloc(32) == off


def test_evicted_entry_a_reader_holds_is_never_overwritten():
    host = HostTier(2 * ENTRY_BYTES)
    host.put(tiny_entry(_key(0), seed=0))
    host.put(tiny_entry(_key(1), seed=1))
    held = host.get(_key(0))  # the stored tensors themselves (no copy)
    assert held.kv.data_ptr() == host.get(_key(0)).kv.data_ptr()
    host.remove(_key(0))
    assert host.usage().bytes == 2 * ENTRY_BYTES  # still in use: the reader holds it
    with pytest.raises(TierFull, match="held by readers"):
        host.put(tiny_entry(_key(2), seed=2))
    assert torch.equal(held.kv, tiny_entry("x", seed=0).kv)
    del held
    host.put(tiny_entry(_key(2), seed=2))
    assert torch.equal(host.get(_key(2)).kv, tiny_entry("x", seed=2).kv)
    assert torch.equal(host.get(_key(1)).kv, tiny_entry("x", seed=1).kv)


def test_store_sends_a_put_down_when_readers_hold_the_whole_host_tier(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    config = StoreConfig(write_behind=False, lease_wait_s=0.01)
    store = TieredStore(config, tiers=[HostTier(ENTRY_BYTES), disk])
    store.put(tiny_entry(_key(0), seed=0))
    held = store.get(_key(0), copy=False)
    store.put(tiny_entry(_key(1), seed=1))  # 0 is evicted (demoted), but its block is still held
    assert torch.equal(held.kv, tiny_entry("x", seed=0).kv)
    assert disk.contains(_key(0)) and disk.contains(_key(1)) and not store.tiers[0].contains(_key(1))
    del held
    store.put(tiny_entry(_key(2), seed=2))
    assert store.tiers[0].keys() == [_key(2)]
    for i in range(3):
        assert torch.equal(store.get(_key(i)).kv, tiny_entry("x", seed=i).kv)
    store.close()


def test_write_behind_demotion_waits_for_the_block_instead_of_evicting_everything(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    store = TieredStore(StoreConfig(), tiers=[HostTier(3 * ENTRY_BYTES), disk])
    for i in range(10):
        store.put(tiny_entry(_key(i), seed=i))
        assert len(store.tiers[0].keys()) == min(i + 1, 3)
    store.flush()
    assert sorted(disk.keys()) == [_key(i) for i in range(7)]
    store.close()


def test_a_larger_entry_evicts_until_one_block_is_free():
    host = HostTier(4 * ENTRY_BYTES)
    store = TieredStore(StoreConfig(), tiers=[host])
    for i in range(4):
        store.put(tiny_entry(_key(i), seed=i))
    store.get(_key(0))  # LRU order: 1, 2, 3, 0
    store.remove(_key(2))  # one free block between 1 and 3: room by bytes, but not in one piece
    big = tiny_entry(_key(9), tokens=8, seed=9)
    assert host.entry_size(big) <= 2 * ENTRY_BYTES
    store.put(big)
    assert torch.equal(store.get(_key(9)).kv, big.kv)
    assert host.usage().bytes <= host.capacity_bytes
    assert not host.contains(_key(1))  # evicted to make the free blocks adjacent
    for key in host.lru_keys():
        i = int(key, 16)
        want = big.kv if i == 9 else tiny_entry("x", seed=i).kv
        assert torch.equal(store.get(key).kv, want)


def test_put_copies_a_borrowed_entry_before_queueing_it(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    store = TieredStore(StoreConfig(), tiers=[HostTier(ENTRY_BYTES), disk])
    store.put(tiny_entry(_key(0), seed=0), pin=True)  # the host tier is full of pins
    entry = tiny_entry(_key(1), seed=1)
    store.put(entry)  # goes to the disk tier through the write-behind queue
    entry.kv.zero_()  # the caller reuses its tensor at once
    store.flush()
    assert torch.equal(disk.get(_key(1)).kv, tiny_entry("x", seed=1).kv)
    store.close()


def test_disk_reads_reuse_their_buffers_and_never_share_a_held_one(tmp_path):
    assert encoded_nbytes(tiny_entry(_key(0))) <= 4096  # one 4 KiB read buffer per file
    disk = DiskTier(tmp_path, 1 << 20, read_pool_bytes=2 * 4096)  # two read buffers
    for i in range(6):
        disk.put(tiny_entry(_key(i), seed=i))
    held = [disk.get(_key(i)) for i in range(6)]  # more than the read pool: the rest use fresh memory
    for i, entry in enumerate(held):
        assert torch.equal(entry.kv, tiny_entry("x", seed=i).kv)
    del held, entry
    gc.collect()
    assert disk._reads.used == 0
    for i in range(6):
        assert torch.equal(disk.get(_key(i)).kv, tiny_entry("x", seed=i).kv)


def _drop_from_page_cache(folder) -> None:
    for path in folder.rglob("*.kvf"):
        fd = os.open(path, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def test_disk_reads_of_uncached_files_are_exact_and_still_verified(tmp_path):
    disk = DiskTier(tmp_path, 1 << 24)
    big = Entry.plain(_key(7), SMOL, torch.randn(SMOL.chunk_shape(16)).half())  # 180 KiB: many blocks
    disk.put(big)
    for i in range(3):
        disk.put(tiny_entry(_key(i), seed=i))
    _drop_from_page_cache(tmp_path)
    assert torch.equal(disk.get(_key(7)).kv, big.kv)
    for i in range(3):
        assert torch.equal(disk.get(_key(i)).kv, tiny_entry("x", seed=i).kv)
    path = disk.path(_key(7))
    with open(path, "r+b") as f:  # flip one byte near the end, then read it from the device again
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    _drop_from_page_cache(tmp_path)
    assert disk.get(_key(7)) is None and not path.exists() and disk.corrupt == 1
