"""Prometheus metrics (`/metrics`), every name prefixed `kvfuse_`.

Store numbers (hits, misses, bytes, evictions... per tier, write-behind queue depth, pins) are read from
`TieredStore.stats()` at scrape time, so they can never drift from the store. Request latencies are
histograms filled by `Timing` (HTTP, ASGI middleware, labelled by route template, not raw path) and by
the lm:// server. Each app has its own registry, so several apps in one process do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.store import TieredStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# from a cached lookup (~100 us) to a large transfer from disk or Redis (~1 s)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_TIER_COUNTERS = ("hits", "misses", "puts", "evictions", "demotions", "promotions", "dropped", "faults")


class StoreCollector(Collector):
    """Per-tier counters and gauges of one TieredStore, read at scrape time."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        tiers = stats["tiers"]
        for name in _TIER_COUNTERS:
            counter = CounterMetricFamily(f"kvfuse_tier_{name}", f"Tier {name} since start", labels=["tier"])
            for tier, row in tiers.items():
                counter.add_metric([tier], row.get(name, 0))
            yield counter
        for name, help_text in (
            ("bytes", "Bytes held by the tier"),
            ("capacity_bytes", "Byte capacity of the tier"),
            ("entries", "Entries held by the tier"),
        ):
            family = GaugeMetricFamily(f"kvfuse_tier_{name}", help_text, labels=["tier"])
            for tier, row in tiers.items():
                if row.get(name) is not None:
                    family.add_metric([tier], row[name])
            yield family
        up = GaugeMetricFamily("kvfuse_tier_up", "1 if the tier is reachable", labels=["tier"])
        for tier, row in tiers.items():
            up.add_metric([tier], 1 if row.get("ok") else 0)
        yield up
        yield GaugeMetricFamily(
            "kvfuse_write_queue_depth",
            "Entries waiting for a write-behind write",
            value=stats["pending_writes"],
        )
        yield GaugeMetricFamily("kvfuse_pinned_entries", "Pinned entries", value=stats["pinned"])


class Metrics:
    """The app's registry and the instruments the HTTP and lm:// servers update."""

    def __init__(self, store: TieredStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(store))
        self.http_seconds = Histogram(
            "kvfuse_http_request_seconds",
            "HTTP request latency (to the end of the response)",
            ["method", "route", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.lm_seconds = Histogram(
            "kvfuse_lm_request_seconds",
            "lm:// request latency (PUT: until stored)",
            ["command", "code"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.lm_bytes = Counter(
            "kvfuse_lm_bytes", "lm:// payload bytes", ["direction"], registry=self.registry
        )
        self.lm_connections = Counter(
            "kvfuse_lm_connections", "lm:// client connections accepted", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timing:
    """ASGI middleware: one `kvfuse_http_request_seconds` observation per HTTP request."""

    def __init__(self, app: Callable, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.http_seconds.labels(scope["method"], route, str(status)).observe(
                    time.perf_counter() - start
                )
