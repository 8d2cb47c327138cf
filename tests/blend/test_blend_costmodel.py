"""The pipelining cost model: r never drops below the point where recompute hides the load."""

from __future__ import annotations

import pytest
import torch

from blend.costmodel import CostModel, measure_bandwidth
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
