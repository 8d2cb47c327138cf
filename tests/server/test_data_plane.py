"""The /v1/kv data plane through a real server: round trips are bit-exact, tenants stay apart."""

from __future__ import annotations

import pytest
import torch
from server_helpers import LAYOUT, kv

from kvstore import Entry, KVLayout, Namespace
from kvstore.remote import RemoteConnector


def _ns(salt: str, layout: KVLayout = LAYOUT) -> Namespace:
    return Namespace("test-model", layout, salt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_entry_round_trip_is_bit_exact(server, dtype):
    layout = KVLayout(2, 3, 8, dtype, 16)
    data = torch.randn(layout.chunk_shape(16)).to(dtype)
    entry = Entry.plain(f"exact-{str(dtype)[6:]}", layout, data, torch.arange(5, 21), origin="test")
    client = server.client()
    client.put(entry)
    got = client.get(entry.key)
    assert got.layout == layout and got.meta == {"origin": "test"}
    assert torch.equal(got.kv.view(torch.uint8), data.view(torch.uint8))  # bytes, not values (NaN-safe)
    assert torch.equal(got.positions, torch.arange(5, 21))


def test_batch_put_get_and_lookup(server):
    client = server.client()
    entries = [Entry.plain(f"batch-{i}", LAYOUT, kv(16, seed=i)) for i in range(5)]
    assert client.put_many(entries) == 5
    got = client.get_many(["batch-0", "batch-missing", "batch-4"])
    assert got[1] is None
    assert torch.equal(got[0].kv, entries[0].kv) and torch.equal(got[2].kv, entries[4].kv)
    assert client.lookup(["batch-0", "batch-1", "batch-missing", "batch-3"]) == 2
    assert client.get("batch-never") is None and not client.contains("batch-never")


def test_remote_connector_prefix_round_trip(server):
    conn = RemoteConnector(server.url, _ns("prefix"))
    tokens = list(range(1000, 1070))  # 4 full 16-token chunks + a partial one
    data = kv(70, seed=1)
    assert conn.lookup(tokens) == 0 and conn.retrieve(tokens) is None
    assert conn.store(tokens, data) == 5
    assert conn.store(tokens, data) == 0  # every chunk already cached
    assert conn.lookup(tokens) == 70
    assert conn.lookup(tokens[:40] + [7] * 30) == 32  # two whole chunks shared
    hit = conn.retrieve(tokens)
    assert torch.equal(hit.kv, data) and torch.equal(hit.positions, torch.arange(70))
    shorter = conn.retrieve(tokens[:50] + [9] * 5)
    assert shorter.num_tokens == 48 and torch.equal(shorter.kv, data[:, :, :48])


def test_store_from_an_offset_and_in_several_requests(server):
    namespace = _ns("pieces")
    one_chunk = LAYOUT.chunk_nbytes(16)
    small = RemoteConnector(server.url, namespace, max_request_bytes=2 * one_chunk)  # 2 chunks per request
    tokens = list(range(2000, 2100))
    data = kv(100, seed=2)
    assert small.store(tokens[:32], data[:, :, :32].contiguous()) == 2
    assert small.store(tokens, data[:, :, 32:].contiguous(), start=32) == 5
    hit = RemoteConnector(server.url, namespace).retrieve(tokens)
    assert torch.equal(hit.kv, data) and torch.equal(hit.positions, torch.arange(100))


def test_tenants_never_see_each_others_entries(server):
    tokens = list(range(3000, 3040))
    alice, bob = RemoteConnector(server.url, _ns("alice")), RemoteConnector(server.url, _ns("bob"))
    alice.store(tokens, kv(40, seed=3))
    alice.put_segment(tokens[:20], kv(20, seed=4))
    assert alice.lookup(tokens) == 40 and bob.lookup(tokens) == 0
    assert bob.retrieve(tokens) is None and bob.get_segment(tokens[:20]) is None
    assert not bob.has_segment(tokens[:20]) and alice.has_segment(tokens[:20])


def test_segments_round_trip_with_positions(server):
    conn = RemoteConnector(server.url, _ns("segments"))
    tokens = list(range(4000, 4023))
    data, positions = kv(23, seed=5), torch.arange(100, 123)
    key = conn.put_segment(tokens, data, positions, pin=True)
    assert key == conn.namespace.segment_key(tokens)
    entry = conn.get_segment(tokens)
    assert torch.equal(entry.kv, data) and torch.equal(entry.positions, positions)
    assert server.client().inspect(key)["pinned"] is True


def test_connector_rejects_bad_input_before_sending(server):
    conn = RemoteConnector(server.url, _ns("local-checks"))
    with pytest.raises(ValueError, match="shape"):
        conn.store(list(range(10)), kv(9))
    with pytest.raises(TypeError, match="dtype"):
        conn.store(list(range(10)), kv(10).float())
    with pytest.raises(ValueError, match="start"):
        conn.store(list(range(40)), kv(30), start=10)
    with pytest.raises(ValueError, match="empty"):
        conn.lookup([])
    assert conn.lookup(list(range(10))) == 0


def test_tiny_entries_are_charged_4_kib_so_memory_stays_bounded(fresh_server):
    """A client's one-token chunks: each entry costs ~2.4 KB of objects besides its 16 tensor bytes, so
    the server charges at least 4 KiB, and host_bytes bounds the count (here 64 entries in 256 KiB)."""
    s = fresh_server({"KVFUSE_HOST_BYTES": "256KiB", "KVFUSE_DISK_BYTES": "0"})
    tiny = KVLayout(1, 1, 4, torch.float16, 1)
    conn = RemoteConnector(s.url, _ns("tiny", tiny))
    tokens = list(range(200))
    assert conn.store(tokens, torch.ones(1, 2, 200, 1, 4, dtype=torch.float16)) == 200
    host = s.client().stats()["tiers"]["host"]
    assert host["entries"] == 64 and host["bytes"] == 64 * 4096
