"""KVConnector: prefix lookup/store/retrieve and segments, with bad input refused and nothing lost."""

from __future__ import annotations

import pytest
import torch
from kvstore_helpers import SMOL

from kvstore import KVConnector, Namespace, StoreConfig, TieredStore


@pytest.fixture
def conn() -> KVConnector:
    return KVConnector(TieredStore(StoreConfig(host_bytes=64 << 20)), Namespace("m", SMOL))


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(SMOL.chunk_shape(tokens), generator=torch.Generator().manual_seed(seed)).half()


def test_store_lookup_retrieve(conn):
    tokens, kv = list(range(40)), _kv(40)
    assert conn.lookup(tokens) == 0 and conn.retrieve(tokens) is None
    assert conn.store(tokens, kv) == 3  # 16 + 16 + 8
    assert conn.lookup(tokens) == 40
    got = conn.retrieve(tokens)
    assert torch.equal(got.kv, kv) and torch.equal(got.positions, torch.arange(40))
    assert conn.store(tokens, kv) == 0  # already cached: nothing rewritten


def test_longer_and_diverging_prompts_reuse_full_chunks(conn):
    tokens, kv = list(range(40)), _kv(40)
    conn.store(tokens, kv)
    assert conn.lookup([*tokens, 1, 2, 3]) == 32  # the partial chunk's key differs once tokens follow
    assert conn.lookup(tokens[:20] + [999] * 30) == 16
    assert conn.lookup([5, *tokens]) == 0
    got = conn.retrieve(tokens[:35])
    assert torch.equal(got.kv, kv[:, :, :32])


def test_store_from_a_chunk_boundary(conn):
    tokens, kv = list(range(48)), _kv(48)
    conn.store(tokens[:16], kv[:, :, :16].contiguous())
    assert conn.store(tokens, kv[:, :, 16:].contiguous(), start=16) == 2
    got = conn.retrieve(tokens)
    assert torch.equal(got.kv, kv) and torch.equal(got.positions, torch.arange(48))
    with pytest.raises(ValueError, match="multiple of 16"):
        conn.store(tokens, kv[:, :, 10:].contiguous(), start=10)


def test_segments_are_found_by_tokens_alone(conn):
    passage, kv = [11, 12, 13, 14, 15], _kv(5, seed=3)
    positions = torch.arange(200, 205)
    key = conn.put_segment(passage, kv, positions)
    assert conn.has_segment(passage) and not conn.has_segment(passage[:4])
    got = conn.get_segment(passage)
    assert got.key == key and torch.equal(got.kv, kv) and torch.equal(got.positions, positions)
    assert conn.lookup(passage) == 0  # segments are not prefixes


def test_tenants_do_not_see_each_other(conn):
    other = KVConnector(conn.kvstore, Namespace("m", SMOL, salt="tenant-b"))
    conn.store(list(range(16)), _kv(16))
    assert other.lookup(list(range(16))) == 0 and other.retrieve(list(range(16))) is None


@pytest.mark.parametrize(
    ("tokens", "kv", "error", "match"),
    [
        ([], _kv(1), ValueError, "empty"),
        (list(range(8)), _kv(8).float(), TypeError, "dtype"),
        (list(range(8)), _kv(9), ValueError, "shape"),
        (list(range(8)), torch.zeros(30, 2, 8, 3, 32, dtype=torch.float16), ValueError, "shape"),
        (list(range(8)), _kv(8).transpose(3, 4).contiguous().transpose(3, 4), ValueError, "contiguous"),
        (list(range(8)), "not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_refused_and_nothing_stored_is_lost(conn, tokens, kv, error, match):
    kept, kept_kv = list(range(100, 132)), _kv(32, seed=9)
    conn.store(kept, kept_kv)
    before = conn.kvstore.stats()["tiers"]["host"]["entries"]
    with pytest.raises(error, match=match):
        conn.store(tokens, kv)
    assert conn.kvstore.stats()["tiers"]["host"]["entries"] == before
    assert torch.equal(conn.retrieve(kept).kv, kept_kv)


def test_bad_positions_are_refused(conn):
    with pytest.raises(TypeError, match="int64"):
        conn.store(list(range(4)), _kv(4), positions=torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="positions shape"):
        conn.store(list(range(4)), _kv(4), positions=torch.arange(5))
