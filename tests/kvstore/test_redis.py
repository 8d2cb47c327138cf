"""Redis tier against a real Redis: round trips, shared byte budget, TTL, and surviving a dead Redis."""

from __future__ import annotations

import socket
import time

import pytest
import redis
import torch
from kvstore_helpers import ENTRY_BYTES, assert_redis_consistent, start_redis, tiny_entry
from redis_keys import delete_prefix, glob_escape, keys_under

from kvstore import StoreConfig, TieredStore
from kvstore.format import encoded_nbytes
from kvstore.tiers import HostTier, RedisTier, TierFull, TierUnavailable
from kvstore.tiers.redis_tier import connect


def _key(i: int) -> str:
    return f"{i:032x}"


SIZE = encoded_nbytes(tiny_entry(_key(0)))


def test_round_trip_usage_and_lru(redis_url, redis_prefix):
    tier = RedisTier(redis_url, 10 * SIZE, prefix=redis_prefix)
    for i in range(3):
        tier.put(tiny_entry(_key(i), seed=i))
    assert tier.usage().entries == 3 and tier.usage().bytes == 3 * SIZE
    assert torch.equal(tier.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)
    assert list(tier.lru_keys()) == [_key(1), _key(2), _key(0)]
    assert tier.contains_many([_key(0), _key(7), _key(2)]) == [True, False, True]
    assert tier.remove(_key(1)) == SIZE and tier.usage().bytes == 2 * SIZE
    assert tier.get(_key(1)) is None


def test_capacity_is_shared_by_every_process_using_the_prefix(redis_url, redis_prefix):
    a = RedisTier(redis_url, 2 * SIZE, prefix=redis_prefix)
    b = RedisTier(redis_url, 2 * SIZE, prefix=redis_prefix)
    a.put(tiny_entry(_key(0)))
    b.put(tiny_entry(_key(1)))
    with pytest.raises(TierFull):
        a.put(tiny_entry(_key(2)))
    assert b.usage().bytes == 2 * SIZE and not b.contains(_key(2))


def test_corrupt_value_is_a_miss_and_is_removed(redis_url, redis_prefix):
    tier = RedisTier(redis_url, 10 * SIZE, prefix=redis_prefix)
    tier.put(tiny_entry(_key(0)))
    raw = redis.Redis.from_url(redis_url)
    data = bytearray(raw.get(redis_prefix + "e:" + _key(0)))
    data[-3] ^= 0xFF
    raw.set(redis_prefix + "e:" + _key(0), bytes(data))
    assert tier.get(_key(0)) is None and tier.corrupt == 1
    assert not tier.contains(_key(0)) and tier.usage().bytes == 0


def test_ttl_expires_entries(redis_url, redis_prefix):
    tier = RedisTier(redis_url, 10 * SIZE, prefix=redis_prefix, ttl_s=1)
    tier.put(tiny_entry(_key(0)))
    assert tier.contains(_key(0))
    time.sleep(1.2)
    assert tier.get(_key(0)) is None and tier.usage().bytes == 0


def test_store_demotes_to_redis_and_promotes_back(redis_url, redis_prefix):
    config = StoreConfig(redis_url=redis_url, redis_prefix=redis_prefix, write_behind=True)
    store = TieredStore(
        config, tiers=[HostTier(2 * ENTRY_BYTES), RedisTier(redis_url, 100 * SIZE, redis_prefix)]
    )
    for i in range(6):
        store.put(tiny_entry(_key(i), seed=i))
    store.flush()
    assert sorted(store.tiers[1].keys()) == [_key(i) for i in range(4)]
    assert store.lookup([_key(i) for i in range(7)]) == 6
    assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)
    assert store.tiers[0].contains(_key(0))
    store.close()


def test_bad_url_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported Redis URL"):
        connect("http://localhost:6379")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server (TCP and unix socket) that a test may kill."""
    sock = tmp_path / "redis.sock"
    proc, port = start_redis(tmp_path, "--unixsocket", str(sock))
    yield proc, f"redis://127.0.0.1:{port}/0", f"unix://{sock}"
    proc.kill()
    proc.wait(timeout=10)


def test_unix_socket_url(own_redis):
    _, _, unix_url = own_redis
    tier = RedisTier(unix_url, 10 * SIZE)
    tier.put(tiny_entry(_key(3), seed=3))
    assert torch.equal(tier.get(_key(3)).kv, tiny_entry(_key(3), seed=3).kv)


def test_redis_stopped_mid_run_leaves_the_local_tiers_working(own_redis, tmp_path):
    proc, url, _ = own_redis
    config = StoreConfig(redis_url=url, redis_retry_s=0.2, redis_timeout_s=0.5)
    tiers = [HostTier(2 * ENTRY_BYTES), RedisTier(url, 100 * SIZE, timeout_s=0.5)]
    store = TieredStore(config, tiers=tiers)
    for i in range(4):
        store.put(tiny_entry(_key(i), seed=i))
    store.flush()
    assert store.tiers[1].contains(_key(0)) and store.health()["ok"]
    proc.kill()
    proc.wait(timeout=10)
    for i in range(4, 10):  # demotions now fail: the store drops them and goes on
        store.put(tiny_entry(_key(i), seed=i))
    store.flush()
    assert store.get(_key(0)) is None  # only Redis had it
    assert torch.equal(store.get(_key(9)).kv, tiny_entry(_key(9), seed=9).kv)
    assert store.lookup([_key(8), _key(9)]) == 2
    stats = store.stats()["tiers"]["redis"]
    assert stats["faults"] >= 1 and stats["ok"] is False and "failed" in stats["error"]
    health = store.health()
    assert not health["ok"] and not health["tiers"]["redis"]["ok"] and health["tiers"]["host"]["ok"]
    with pytest.raises(TierUnavailable):
        store.tiers[1].contains(_key(0))
    store.close()


@pytest.fixture
def redis_cluster(tmp_path):
    """A real one-node Redis Cluster (cluster mode on, all 16384 slots on the node): the cluster client's
    code paths (slot routing, cluster pipelines, scripts on one slot) run as against a larger cluster."""
    conf = str(tmp_path / "nodes.conf")
    proc, port = start_redis(tmp_path, "--cluster-enabled", "yes", "--cluster-config-file", conf)
    node = redis.Redis(port=port, socket_connect_timeout=2, socket_timeout=2)
    try:
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the one-node cluster never reached cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_redis_cluster_url_round_trip_capacity_and_store(redis_cluster):
    tier = RedisTier(redis_cluster, 3 * SIZE, prefix="kvfuse-test-cluster:")
    assert type(tier.client).__name__ == "RedisCluster"
    for i in range(3):
        tier.put(tiny_entry(_key(i), seed=i))
    assert tier.usage().entries == 3 and tier.usage().bytes == 3 * SIZE
    with pytest.raises(TierFull):
        tier.put(tiny_entry(_key(3)))
    assert torch.equal(tier.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)
    assert list(tier.lru_keys()) == [_key(1), _key(2), _key(0)]
    assert tier.contains_many([_key(0), _key(7), _key(2)]) == [True, False, True]  # cluster pipeline
    assert tier.remove(_key(1)) == SIZE and tier.get(_key(1)) is None
    # the store builds its Redis tier from the cluster URL, as `kvfuse serve` with KVFUSE_REDIS_URL does
    store = TieredStore(StoreConfig(host_bytes=2 * ENTRY_BYTES, redis_url=redis_cluster))
    assert [t.name for t in store.tiers] == ["host", "redis"]
    for i in range(5):
        store.put(tiny_entry(_key(i), seed=i))
    store.flush()
    assert sorted(store.tiers[1].keys()) == [_key(i) for i in range(3)]  # demoted through the cluster
    assert torch.equal(store.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)  # and promoted back
    store.close()


def test_a_failed_set_leaves_no_uncounted_data_key(redis_url, redis_prefix, monkeypatch):
    """The reservation is made, then the SET fails (the connection drops before it is sent, or after
    Redis applied it): the key's data may not stay in Redis uncounted and out of the LRU (it was
    readable, never evicted, and its bytes missing from the shared budget)."""
    tier = RedisTier(redis_url, 100 * SIZE, redis_prefix)
    real_set = tier.client.set
    for i, landed in enumerate((False, True)):
        key = _key(i)
        tier.put(tiny_entry(key, seed=1))

        def failing_set(*args, landed=landed, **kwargs):
            if landed:
                real_set(*args, **kwargs)
            raise redis.exceptions.ConnectionError("injected: connection dropped during SET")

        monkeypatch.setattr(tier.client, "set", failing_set)
        with pytest.raises(TierUnavailable):
            tier.put(tiny_entry(key, tokens=8, seed=2))  # a different size than the copy there
        monkeypatch.undo()
        assert_redis_consistent(tier)
        assert tier.get(key) is None  # the older copy is not served in place of the failed one


@pytest.mark.parametrize("tag", ["a-b", "x*y?", "[z]", "back\\slash"])
def test_a_parametrized_test_leaves_no_keys_in_redis(redis_url, redis_prefix, request, tag):
    """A parametrized test's name holds `[` and `]` (here also `*`, `?`, `\\`), glob syntax in SCAN
    MATCH: the redis_prefix fixture built its cleanup pattern from the name, which matched none of
    the test's keys, and they stayed in the shared Redis. The fixture's prefix is now free of glob
    syntax (so are the tests' own patterns built from it), and the cleanup also escapes a prefix
    that holds the name as it is."""
    client = redis.Redis.from_url(redis_url)
    as_named = f"kvfuse-test:{request.node.name}:{time.monotonic_ns()}:"  # the prefix as it was built
    assert "[" in as_named and glob_escape(redis_prefix) == redis_prefix
    for prefix in (redis_prefix, as_named):
        try:
            RedisTier(redis_url, 10 * SIZE, prefix=prefix).put(tiny_entry(_key(0)))
            assert keys_under(client, prefix)  # the entry and the tier's index keys
            delete_prefix(client, prefix)
            assert keys_under(client, prefix) == []
        finally:
            for key in keys_under(client, prefix):
                client.delete(key)
