"""The spec's cost model for pipelined loading: recompute at least as much as loading takes anyway.

With layer i+1's KV loading while layer i recomputes, a layer costs max(T_recompute(r), T_load), where
`T_recompute(r) = r * T_prefill_layer` and `T_load = bytes_per_layer / bandwidth`. Any r below the one
where the two meet buys no speed, so `r = max(r_quality, r_load)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.runner import Engine
from kvstore.store import TieredStore
from kvstore.tiers.base import Tier


@dataclass(frozen=True)
class CostModel:
    prefill_s_per_token_layer: float  # measured full-prefill time per token per layer
    bandwidth_bytes_per_s: float  # measured read bandwidth of the tier holding the passages
    bytes_per_token_layer: int  # K and V of one token in one layer

    def __post_init__(self) -> None:
        for name in ("prefill_s_per_token_layer", "bandwidth_bytes_per_s", "bytes_per_token_layer"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)!r}")

    def load_ratio(self) -> float:
        """The r at which recomputing a layer takes as long as loading it."""
        load = self.bytes_per_token_layer / self.bandwidth_bytes_per_s
        return load / self.prefill_s_per_token_layer

    def ratio(self, r_quality: float) -> float:
        if not 0.0 <= r_quality <= 1.0:
            raise ValueError(f"r_quality must lie in [0, 1], got {r_quality}")
        return min(1.0, max(r_quality, self.load_ratio()))


def measure_bandwidth(store: TieredStore, keys: list[str]) -> float:
    """Bytes per second of reading `keys` from wherever they are (the store's own get path)."""
    total, t0 = 0, time.perf_counter()
    for key in keys:
        entry = store.get(key, copy=False)
        if entry is None:
            raise ValueError(f"key {key!r} is not in the store")
        total += entry.nbytes
    return total / max(time.perf_counter() - t0, 1e-9)


def measure_prefill(engine: Engine, tokens: int = 256) -> float:
    """Seconds of full prefill per token per layer, timed on a forward of `tokens` ids (after a warm-up)."""
    if not 16 <= tokens <= engine.spec.max_positions:
        raise ValueError(f"tokens must be in [16, {engine.spec.max_positions}], got {tokens}")
    ids = [1000 + i % 1000 for i in range(tokens)]
    engine.forward(ids[:16], logits="none")
    t0 = time.perf_counter()
    engine.forward(ids, logits="none")
    return (time.perf_counter() - t0) / (tokens * engine.spec.num_layers)


def source_tier(store: TieredStore, keys: list[str]) -> Tier | None:
    """The tier a fused query reads from: each key comes from the fastest tier holding it (a get
    promotes from there), and the load takes as long as the slowest of those. None if no tier holds any."""
    slowest = None
    for key in keys:
        for i, tier in enumerate(store.tiers):
            if tier.contains(key):
                slowest = i if slowest is None else max(slowest, i)
                break
    return None if slowest is None else store.tiers[slowest]


def tier_bandwidth(tier: Tier, keys: list[str]) -> float | None:
    """Bytes per second of loading `keys` from one tier (no promotion, nothing else touched): the read
    plus one copy of the tensors, as fusing copies them into the cache (a host-tier read alone is a
    reference, and would make loading look free). None when none of them is there any more."""
    total, t0 = 0, time.perf_counter()
    for key in keys:
        entry = tier.get(key)
        if entry is None:  # evicted since it was listed: the others still measure the tier
            continue
        for t in entry.tensors.values():
            t.clone()
        total += entry.nbytes
    if total == 0:
        return None
    return total / max(time.perf_counter() - t0, 1e-9)


class AutoRatio:
    """CacheBlend's r for a query from the tier its passages come from (the spec's cost model).

    Prefill speed is measured once; each tier's read bandwidth is measured once, on the first query
    whose passages come from it, by reading up to `sample` of that query's entries from that tier.
    """

    def __init__(self, engine: Engine, store: TieredStore, sample: int = 8) -> None:
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        self.engine, self.store, self.sample = engine, store, sample
        self.prefill_s: float | None = None
        self.bandwidth: dict[str, float] = {}  # tier name -> bytes/s

    def model(self, keys: list[str]) -> tuple[CostModel, str] | None:
        """The cost model for loading `keys`, and the tier's name; None if no tier holds them."""
        tier = source_tier(self.store, keys)
        if tier is None:
            return None
        if self.prefill_s is None:
            self.prefill_s = measure_prefill(self.engine)
        if tier.name not in self.bandwidth:
            held = [k for k in keys if tier.contains(k)][: self.sample]
            measured = tier_bandwidth(tier, held)
            if measured is None:  # all evicted meanwhile: they will be computed, not loaded
                return None
            self.bandwidth[tier.name] = measured
        spec = self.engine.spec
        per_layer = spec.kv_bytes_per_token // spec.num_layers
        return CostModel(self.prefill_s, self.bandwidth[tier.name], per_layer), tier.name

    def ratio(self, keys: list[str], r_quality: float) -> float:
        """`max(r_quality, r_load)` for these keys; r_quality when nothing is stored (all computed)."""
        found = self.model(keys)
        return r_quality if found is None else found[0].ratio(r_quality)
