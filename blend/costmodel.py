"""The spec's cost model for pipelined loading: recompute at least as much as loading takes anyway.

With layer i+1's KV loading while layer i recomputes, a layer costs max(T_recompute(r), T_load), where
`T_recompute(r) = r * T_prefill_layer` and `T_load = bytes_per_layer / bandwidth`. Any r below the one
where the two meet buys no speed, so `r = max(r_quality, r_load)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvstore.store import TieredStore


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
