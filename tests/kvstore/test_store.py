"""TieredStore placement: LRU eviction, demotion down the tiers, promotion, pins, capacity, lookups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvstore_helpers import ENTRY_BYTES, tiny_entry

from kvstore import StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import DiskTier, HostTier


def _store(tmp_path, host_entries=3, disk_entries=100, write_behind=False) -> TieredStore:
    disk = DiskTier(tmp_path / "disk", capacity_bytes=disk_entries * _disk_size())
    host = HostTier(host_entries * ENTRY_BYTES)
    return TieredStore(StoreConfig(write_behind=write_behind, lease_wait_s=0.01), tiers=[host, disk])


def _disk_size() -> int:
    return encoded_nbytes(tiny_entry("0" * 32))


def _key(i: int) -> str:
    return f"{i:032x}"


def test_eviction_is_lru_and_demotes_to_the_next_tier(tmp_path):
    store = _store(tmp_path)
    host, disk = store.tiers
    for i in range(3):
        store.put(tiny_entry(_key(i), seed=i))
    assert store.get(_key(0)) is not None  # 0 becomes most recently used
    store.put(tiny_entry(_key(3), seed=3))
    assert host.keys() == [_key(2), _key(0), _key(3)]  # 1 was the least recently used
    assert disk.keys() == [_key(1)]
    stats = store.stats()["tiers"]
    assert stats["host"]["evictions"] == 1 and stats["host"]["demotions"] == 1
    back = store.get(_key(1))  # a disk hit is promoted (copied up, the disk copy stays)
    assert torch.equal(back.kv, tiny_entry(_key(1), seed=1).kv)
    assert host.keys()[-1] == _key(1) and disk.contains(_key(1))
    assert store.stats()["tiers"]["disk"]["promotions"] == 1


def test_demotion_goes_all_the_way_down_and_the_last_tier_drops(tmp_path):
    host = HostTier(1 * ENTRY_BYTES)
    disk = DiskTier(tmp_path / "disk", 2 * _disk_size())
    store = TieredStore(StoreConfig(write_behind=False), tiers=[host, disk])
    for i in range(5):
        store.put(tiny_entry(_key(i), seed=i))
    assert host.keys() == [_key(4)]
    assert disk.keys() == [_key(2), _key(3)]
    assert store.get(_key(0)) is None and store.get(_key(1)) is None
    assert store.stats()["tiers"]["disk"]["dropped"] == 2


def test_get_resident_answers_from_the_top_tier_only(tmp_path):
    store = _store(tmp_path, host_entries=1)
    store.put(tiny_entry(_key(0), seed=0))
    store.put(tiny_entry(_key(1), seed=1))  # 0 goes down to disk
    assert torch.equal(store.get_resident(_key(1)).kv, tiny_entry(_key(1), seed=1).kv)
    assert store.get_resident(_key(0)) is None and store.get_resident(_key(9)) is None
    assert store.tiers[0].keys() == [_key(1)]  # nothing promoted, nothing read from disk
    stats = store.stats()["tiers"]
    assert stats["host"]["hits"] == 1 and stats["host"]["misses"] == 0 and stats["disk"]["hits"] == 0


def test_tiny_entries_are_charged_the_minimum_so_their_count_is_bounded():
    store = TieredStore(StoreConfig(host_bytes=16 << 10, host_min_entry_bytes=4096, write_behind=False))
    for i in range(10):
        store.put(tiny_entry(_key(i), seed=i))  # 544 tensor bytes each
    host = store.stats()["tiers"]["host"]
    assert host["entries"] == 4 and host["bytes"] == 16 << 10 and host["dropped"] == 6


def test_lookup_and_contains_move_nothing(tmp_path):
    store = _store(tmp_path, host_entries=2)
    for i in range(4):
        store.put(tiny_entry(_key(i), seed=i))
    before = [t.keys() for t in store.tiers]
    assert store.lookup([_key(0), _key(1), _key(2), _key(9), _key(3)]) == 3
    assert store.contains(_key(0)) and not store.contains(_key(9))
    assert [t.keys() for t in store.tiers] == before
    assert all(row["promotions"] == 0 for row in store.stats()["tiers"].values())


def test_pinned_entries_are_never_evicted(tmp_path):
    store = _store(tmp_path, host_entries=2)
    store.put(tiny_entry(_key(0)), pin=True)
    for i in range(1, 6):
        store.put(tiny_entry(_key(i), seed=i))
    assert store.tiers[0].contains(_key(0))
    store.unpin(_key(0))
    store.put(tiny_entry(_key(7)))
    store.put(tiny_entry(_key(8)))
    assert not store.tiers[0].contains(_key(0)) and store.tiers[1].contains(_key(0))


def test_pins_survive_a_restart_beside_the_disk_tier(tmp_path):
    config = StoreConfig(host_bytes=2 * ENTRY_BYTES, disk_path=str(tmp_path / "disk"), write_behind=False)
    with TieredStore(config) as store:
        for i in range(3):
            store.put(tiny_entry(_key(i), seed=i), pin=i < 2)
        store.pin(_key(2))
        store.unpin(_key(1))
    # closed: memory entries persisted to disk; a new process finds them and their pins
    with TieredStore(config) as store:
        assert [store.is_pinned(_key(i)) for i in range(3)] == [True, False, True]
        for i in range(3, 8):  # the host tier turns over; pinned 0 and 2 stay wherever they are
            store.put(tiny_entry(_key(i), seed=i))
        store.remove(_key(2))
    with TieredStore(config) as store:
        assert store.is_pinned(_key(0)) and not store.is_pinned(_key(2)) and store.stats()["pinned"] == 1
        store.clear()
    with TieredStore(config) as store:
        assert store.stats()["pinned"] == 0


def test_an_unreadable_pins_file_loses_pins_not_entries(tmp_path):
    config = StoreConfig(host_bytes=0, disk_path=str(tmp_path / "disk"), write_behind=False)
    with TieredStore(config) as store:
        store.put(tiny_entry(_key(0), seed=0), pin=True)
    (tmp_path / "disk" / "pins.msgpack").write_bytes(b"\xc1 not msgpack")
    with TieredStore(config) as store:
        assert not store.is_pinned(_key(0))
        assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)
        store.pin(_key(0))  # and the next change writes a good file
    with TieredStore(config) as store:
        assert store.is_pinned(_key(0))


def test_a_failed_put_keeps_an_older_pin():
    store = TieredStore(StoreConfig(), tiers=[HostTier(2 * ENTRY_BYTES)])
    store.put(tiny_entry(_key(0), seed=0), pin=True)
    store.put(tiny_entry(_key(1), seed=1), pin=True)
    with pytest.raises(ValueError, match="no tier has room"):
        store.put(tiny_entry(_key(0), seed=0, tokens=64), pin=True)  # too big for the tier
    assert store.is_pinned(_key(0))


@pytest.mark.parametrize("write_behind", [False, True])
def test_an_overwritten_entry_never_comes_back_old_after_eviction(tmp_path, write_behind):
    store = _store(tmp_path, host_entries=2, write_behind=write_behind)
    store.put(tiny_entry(_key(0), seed=1))
    for i in range(1, 3):  # 0 (first version) goes down to disk
        store.put(tiny_entry(_key(i), seed=10 + i))
    store.flush()
    assert store.tiers[1].contains(_key(0))
    store.put(tiny_entry(_key(0), seed=2))  # second version, in the host tier; disk still has the first
    for i in range(3, 6):  # 0 is evicted again: its second version must replace the first on disk
        store.put(tiny_entry(_key(i), seed=10 + i))
    store.flush()
    assert not store.tiers[0].contains(_key(0))
    assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=2).kv)
    # and once promoted (the same bytes as on disk), a later eviction need not write it again
    before = store.stats()["tiers"]["host"]["demotions"]
    for i in range(6, 8):
        store.put(tiny_entry(_key(i), seed=10 + i))
    store.flush()
    assert store.stats()["tiers"]["host"]["demotions"] == before + 1  # key 5 only: 0 was clean
    assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=2).kv)


def test_an_overwritten_entry_never_comes_back_old_after_a_restart(tmp_path):
    config = StoreConfig(host_bytes=4 * ENTRY_BYTES, disk_path=str(tmp_path / "disk"))
    with TieredStore(config) as store:
        store.put(tiny_entry(_key(0), seed=1))
    with TieredStore(config) as store:  # the first version is on disk now
        store.put(tiny_entry(_key(0), seed=2))
        assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=2).kv)
    with TieredStore(config) as store:
        assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=2).kv)


def test_a_put_that_lands_below_an_older_copy_removes_it():
    """The second version does not fit the top tier, which holds the first: it lands in the next tier,
    and the first may not stay above it (a get would find it first)."""
    host, lower = HostTier(2 * ENTRY_BYTES), HostTier(8 * ENTRY_BYTES)
    lower.name = "lower"
    store = TieredStore(StoreConfig(), tiers=[host, lower])
    store.put(tiny_entry(_key(0), seed=1))
    store.put(tiny_entry(_key(0), seed=2, tokens=16))  # 4x larger than the host tier
    assert not host.contains(_key(0)) and lower.contains(_key(0))
    assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=2, tokens=16).kv)


def test_everything_pinned_is_a_clear_error_and_loses_nothing():
    store = TieredStore(StoreConfig(), tiers=[HostTier(2 * ENTRY_BYTES)])
    store.put(tiny_entry(_key(0), seed=0), pin=True)
    store.put(tiny_entry(_key(1), seed=1), pin=True)
    with pytest.raises(ValueError, match="pinned"):
        store.put(tiny_entry(_key(2), seed=2))
    for i in range(2):
        assert torch.equal(store.get(_key(i)).kv, tiny_entry(_key(i), seed=i).kv)
    assert not store.contains(_key(2)) and not store.is_pinned(_key(2))


def test_an_entry_bigger_than_every_tier_is_refused():
    store = TieredStore(StoreConfig(), tiers=[HostTier(ENTRY_BYTES - 1)])
    with pytest.raises(ValueError, match="no tier has room"):
        store.put(tiny_entry(_key(0)))


def test_pin_of_a_missing_key_is_a_key_error():
    store = TieredStore(StoreConfig(), tiers=[HostTier(ENTRY_BYTES)])
    with pytest.raises(KeyError, match="not in the store"):
        store.pin(_key(5))


def test_stored_and_returned_tensors_are_private_copies():
    store = TieredStore(StoreConfig(), tiers=[HostTier(4 * ENTRY_BYTES)])
    entry = tiny_entry(_key(0))
    expected = entry.kv.clone()
    store.put(entry)
    entry.kv.zero_()
    got = store.get(_key(0))
    got.kv.fill_(7)
    assert torch.equal(store.get(_key(0)).kv, expected)


def test_write_behind_keeps_entries_readable_until_written(tmp_path):
    store = _store(tmp_path, host_entries=1, write_behind=True)
    for i in range(20):
        store.put(tiny_entry(_key(i), seed=i))
        assert store.lookup([_key(j) for j in range(i + 1)]) == i + 1  # pending writes count as held
    store.flush()
    assert store.stats()["pending_writes"] == 0
    assert len(store.tiers[1].keys()) == 19
    for i in range(20):
        assert torch.equal(store.get(_key(i)).kv, tiny_entry(_key(i), seed=i).kv)
    store.close()


def test_write_through_copies_every_put_to_the_slow_tiers(tmp_path):
    disk = DiskTier(tmp_path / "disk", 10 * _disk_size())
    store = TieredStore(StoreConfig(write_through=True), tiers=[HostTier(10 * ENTRY_BYTES), disk])
    store.put(tiny_entry(_key(0)))
    store.flush()
    assert store.tiers[0].contains(_key(0)) and disk.contains(_key(0))
    store.close()


def test_remove_and_clear(tmp_path):
    store = _store(tmp_path, host_entries=1)
    store.put(tiny_entry(_key(0)))
    store.put(tiny_entry(_key(1)))
    assert store.remove(_key(0)) and not store.contains(_key(0))
    assert not store.remove(_key(0))
    store.clear()
    assert store.keys() == [] and store.stats()["tiers"]["disk"]["bytes"] == 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "get", "pin", "unpin", "remove", "hold", "release"]),
        st.integers(0, 11),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, write_behind=st.booleans())
def test_capacity_is_never_exceeded_and_data_is_never_wrong(tmp_path_factory, ops, write_behind):
    root = tmp_path_factory.mktemp("prop")
    store = _store(root, host_entries=3, disk_entries=4, write_behind=write_behind)
    held: list[tuple[int, object]] = []  # get(copy=False) results a reader keeps: never overwritten
    try:
        for op, i in ops:
            _apply(store, op, i, held)
            for j, entry in held:
                assert torch.equal(entry.kv, tiny_entry("x", seed=j).kv)
            for tier in store.tiers:
                assert tier.usage().bytes <= tier.capacity_bytes
            on_disk = sum(f.stat().st_size for f in (root / "disk").rglob("*.kvf"))
            assert on_disk <= store.tiers[1].capacity_bytes
    finally:
        store.close()


def _apply(store: TieredStore, op: str, i: int, held: list) -> None:
    key = _key(i)
    if op == "hold" and (got := store.get(key, copy=False)) is not None:
        held.append((i, got))
    elif op == "release":
        held.clear()
    elif op == "put":
        try:
            store.put(tiny_entry(key, seed=i))
        except ValueError:
            assert store.stats()["pinned"] >= 3  # only refused when the host is full of pins
    elif op == "get":
        got = store.get(key)
        assert got is None or torch.equal(got.kv, tiny_entry(key, seed=i).kv)
        if store.is_pinned(key):
            assert got is not None
    elif op == "pin" and store.contains(key) and store.tiers[0].contains(key):
        store.pin(key)
    elif op == "unpin":
        store.unpin(key)
    elif op == "remove":
        store.remove(key)
