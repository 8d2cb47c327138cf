"""Per-category counters and lookup latency (a ring of recent samples for p50/p99)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

COUNTERS = (
    "lookups",
    "hits",
    "misses",
    "inserts",
    "rejected_by_verifier",
    "expired",
    "evictions",
    "not_cacheable",
    "store_errors",
    "scope_limit",  # inserts refused: max_scopes scopes exist
)


@dataclass
class CategoryMetrics:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    # Sum over hits of (1 - P(same meaning)) from the verifier: the expected number of false hits.
    false_hit_estimate: float = 0.0
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=2048))

    def snapshot(self) -> dict:
        lat = np.asarray(self.latency_ms, dtype=np.float64)
        hits, lookups = self.counts["hits"], self.counts["lookups"]
        return {
            **self.counts,
            "hit_rate": hits / lookups if lookups else 0.0,
            "false_hits_estimated": round(self.false_hit_estimate, 3),
            "false_hit_rate_estimated": self.false_hit_estimate / hits if hits else 0.0,
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_ms_p99": float(np.percentile(lat, 99)) if lat.size else None,
        }


class Metrics:
    def __init__(self) -> None:
        self._cats: dict[str, CategoryMetrics] = defaultdict(CategoryMetrics)
        self._lock = threading.Lock()
        self.flushes_detected = 0

    def count(self, category: str, name: str, n: int = 1) -> None:
        with self._lock:
            self._cats[category].counts[name] += n

    def lookup(self, category: str, hit: bool, latency_ms: float, p_false: float = 0.0) -> None:
        with self._lock:
            m = self._cats[category]
            m.counts["lookups"] += 1
            m.counts["hits" if hit else "misses"] += 1
            m.false_hit_estimate += p_false if hit else 0.0
            m.latency_ms.append(latency_ms)

    def snapshot(self) -> dict:
        with self._lock:
            return {name: m.snapshot() for name, m in sorted(self._cats.items())}
