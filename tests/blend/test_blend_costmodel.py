"""The pipelining cost model: r never drops below the point where recompute hides the load."""

from __future__ import annotations

import pytest
import torch
from blend_cases import PASSAGES

from blend.costmodel import CostModel, measure_bandwidth, source_tier, tier_bandwidth
from blend.pipeline import RagConfig, RagPipeline
from kvstore import Entry, KVLayout, StoreConfig, TieredStore


def test_ratio_is_the_larger_of_quality_and_load():
    # 1 ms of prefill per token-layer; 1 KB per token-layer at 10 MB/s = 0.1 ms to load -> r_load = 0.1
    slow = CostModel(1e-3, 10e6, 1000)
    assert slow.load_ratio() == pytest.approx(0.1)
    assert slow.ratio(0.15) == 0.15
    assert slow.ratio(0.05) == pytest.approx(0.1)
    assert CostModel(1e-3, 1e5, 1000).ratio(0.15) == 1.0  # loading slower than prefill: recompute all
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s"):
        CostModel(1e-3, 0, 1000)
    with pytest.raises(ValueError, match="r_quality"):
        slow.ratio(1.5)


def test_measured_bandwidth_of_a_real_tier(tmp_path):
    layout = KVLayout(2, 1, 8, torch.float32, 16)
    with TieredStore(StoreConfig(host_bytes=0, disk_path=str(tmp_path), write_behind=False)) as store:
        entries = [Entry.plain(f"{i:032x}", layout, torch.randn(layout.chunk_shape(16))) for i in range(4)]
        for e in entries:
            store.put(e)
        assert measure_bandwidth(store, [e.key for e in entries]) > 0
        with pytest.raises(ValueError, match="not in the store"):
            measure_bandwidth(store, ["f" * 32])


def test_source_tier_is_the_slowest_tier_a_query_reads_from(tmp_path):
    layout = KVLayout(2, 1, 8, torch.float32, 16)
    config = StoreConfig(host_bytes=1 << 20, disk_path=str(tmp_path), write_behind=False)
    with TieredStore(config) as store:
        a, b = (Entry.plain(f"{i:032x}", layout, torch.randn(layout.chunk_shape(16))) for i in range(2))
        store.put(a)
        store.tiers[1].put(b)  # b only on disk
        assert source_tier(store, [a.key]).name == "host"
        assert source_tier(store, [a.key, b.key]).name == "disk"
        assert source_tier(store, ["f" * 32]) is None
        assert tier_bandwidth(store.tiers[1], [b.key]) > 0
        assert not store.tiers[0].contains(b.key)  # measuring a tier promotes nothing
        # a key evicted between listing and measuring is skipped; none left is no measurement
        assert tier_bandwidth(store.tiers[1], ["f" * 32, b.key]) > 0
        assert tier_bandwidth(store.tiers[1], ["f" * 32]) is None


def test_auto_ratio_follows_the_measured_tier(engine, tmp_path):
    """RagConfig(recompute_ratio="auto"): r = max(blend.ratio, r_load) from the tier the passages come
    from; a tier measured slower than recomputing makes CacheBlend recompute everything (= full prefill)."""
    config = StoreConfig(host_bytes=0, disk_path=str(tmp_path), write_behind=False)
    rag = RagConfig(max_new_tokens=6, progress=False, recompute_ratio="auto")
    question = "When was the Eiffel Tower completed?"
    with TieredStore(config) as store:
        pipeline = RagPipeline(engine, store, config=rag)
        pipeline.ingest(PASSAGES)
        answer = pipeline.answer(question, passages=PASSAGES)
        auto = pipeline.auto_ratio
        assert set(auto.bandwidth) == {"disk"} and auto.prefill_s > 0
        keys = [
            pipeline.connector.namespace.segment_key(ids)
            for ids in pipeline.prompt(question, PASSAGES).passages
        ]
        model, tier = auto.model(keys)
        assert tier == "disk"
        assert answer.recompute_ratio == pytest.approx(max(0.15, model.load_ratio()))
        auto.bandwidth["disk"] = 1.0  # one byte per second: loading dwarfs any recompute
        slow = pipeline.answer(question, passages=PASSAGES)
        assert slow.recompute_ratio == 1.0
        full = pipeline.answer(question, passages=PASSAGES, method="full_prefill")
        assert slow.text == full.text and full.recompute_ratio is None


@pytest.mark.parametrize("bad", ["fast", 1.5, -0.1, True, [0.1]])
def test_recompute_ratio_is_validated(bad):
    with pytest.raises(ValueError, match="recompute_ratio"):
        RagConfig(recompute_ratio=bad)
    assert RagConfig(recompute_ratio=0.3).blend.ratio == 0.3
    assert RagConfig(recompute_ratio="auto").blend.ratio == 0.15
