"""16 threads putting and getting at once lose nothing and corrupt nothing."""

from __future__ import annotations

import random
import threading

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
