"""Adaptive load policy: under downstream model load, serve more from cache.

When a model's load reaches `high`, thresholds of its non-strict categories drop by `threshold_step`
(never below `threshold_floor`) and new entries get `ttl_factor` times the TTL. The model returns to
normal only when load falls to `low` (< high): the gap is hysteresis, so a load hovering at the
boundary does not flip the policy on every signal. Entries are still never served past their expiry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from semcache.categories import Category


@dataclass
class LoadPolicyConfig:
    high: float = 0.8
    low: float = 0.6
    threshold_step: float = 0.03
    threshold_floor: float = 0.85
    ttl_factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1 for hysteresis, got low={self.low} high={self.high}")
        if not 0.0 <= self.threshold_step < 1.0:
            raise ValueError(f"threshold_step must be in [0, 1), got {self.threshold_step}")
        if not 0.0 < self.threshold_floor <= 1.0:
            raise ValueError(f"threshold_floor must be in (0, 1], got {self.threshold_floor}")
        if self.ttl_factor < 1.0:
            raise ValueError(f"ttl_factor must be >= 1 (it lengthens TTLs), got {self.ttl_factor}")


class LoadPolicy:
    def __init__(self, config: LoadPolicyConfig | None = None) -> None:
        self.config = config or LoadPolicyConfig()
        self._relaxed: dict[str, bool] = {}
        self._load: dict[str, float] = {}
        self._lock = threading.Lock()

    def set_load(self, model: str, load: float) -> bool:
        """Record a load signal in [0, 1] for `model`; returns whether the model is now relaxed."""
        if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0.0 <= load <= 1.0:
            raise ValueError(f"load must be a number in [0, 1], got {load!r}")
        with self._lock:
            self._load[model] = float(load)
            was = self._relaxed.get(model, False)
            now = load >= self.config.high if not was else load > self.config.low
            self._relaxed[model] = now
            return now

    def relaxed(self, model: str) -> bool:
        return self._relaxed.get(model, False)

    def threshold(self, cat: Category, model: str) -> float:
        if cat.strict or not self.relaxed(model):
            return cat.threshold
        # The floor caps the relaxation; a category already below the floor is left where it is.
        return max(
            cat.threshold - self.config.threshold_step, min(self.config.threshold_floor, cat.threshold)
        )

    def ttl(self, cat: Category, model: str) -> float:
        if cat.strict or not self.relaxed(model):
            return cat.ttl_s
        return cat.ttl_s * self.config.ttl_factor

    def state(self) -> dict:
        with self._lock:
            return {m: {"load": self._load[m], "relaxed": self._relaxed[m]} for m in self._load}
