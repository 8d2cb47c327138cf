"""The retriever interface: the full KV lives in the kvstore, a bounded working set is resident.

A retriever turns a context into a `KVCache` whose layers are its own `LayerKV` subclasses. The engine
only calls `layer.update(k, v)` and hands the layer to the retriever's `attention` function (as
`call.kv`); that function decides, per layer and step, what is resident (fetching units from the store)
and attends exactly over it, at the tokens' original (or, for ReKV, reassigned) positions.

Every retriever reports the same counters (`RetrievalStats`) and states its bound (`budget_bytes`):
resident KV never exceeds it once the context is offloaded.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.attention import AttnCall
from engine.runner import Engine
from kvstore.layout import KVLayout
from kvstore.store import TieredStore
from retrieval.offload import Traffic, UnitStore, default_store


@dataclass
class RetrievalStats:
    """Counters over a retriever's life (reset with `Retriever.reset_stats`).

    steps: decode steps (query rows) that went through retrieval-managed layers.
    layer_steps / retrievals: (layer, step) pairs, and those that re-selected what is resident.
    retrieval_steps: steps on which at least one layer re-selected.
    first_layer_steps / first_retrievals: the (layer, step) pairs and retrievals of the first step alone
        (LouisKV always retrieves there: on a 15-step answer that is 1/15 of the rate by itself).
    tokens_selected: tokens chosen by all selections together (already resident or not);
    tokens_fetched / bytes_fetched / units_fetched: what really moved from the store into the working set;
    bytes_offloaded / units_offloaded: what moved from the working set into the store.
    resident_bytes / peak_resident_bytes: KV bytes held in the working set, now and at most.
    retrieve_s: wall time spent scoring, fetching and rebuilding the working set.
    """

    steps: int = 0
    layer_steps: int = 0
    retrievals: int = 0
    retrieval_steps: int = 0
    first_layer_steps: int = 0
    first_retrievals: int = 0
    tokens_selected: int = 0
    tokens_fetched: int = 0
    bytes_fetched: int = 0
    units_fetched: int = 0
    bytes_offloaded: int = 0
    units_offloaded: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    retrieve_s: float = 0.0

    @property
    def retrieval_rate(self) -> float:
        """Share of (layer, step) pairs that retrieved."""
        return self.retrievals / self.layer_steps if self.layer_steps else 0.0

    @property
    def retrieval_rate_after_first(self) -> float:
        """Share of (layer, step) pairs that retrieved, leaving out the first step (the trigger's own
        choices; what `calibrate_tau` counts by default)."""
        pairs = self.layer_steps - self.first_layer_steps
        return (self.retrievals - self.first_retrievals) / pairs if pairs else 0.0

    @property
    def step_retrieval_rate(self) -> float:
        """Share of steps on which any layer retrieved."""
        return self.retrieval_steps / self.steps if self.steps else 0.0

    @property
    def step_retrieval_rate_after_first(self) -> float:
        """Share of steps after the first on which any layer retrieved."""
        later = self.retrieval_steps - (self.first_retrievals > 0)
        return later / (self.steps - 1) if self.steps > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            retrieval_rate=self.retrieval_rate,
            retrieval_rate_after_first=self.retrieval_rate_after_first,
            step_retrieval_rate=self.step_retrieval_rate,
            step_retrieval_rate_after_first=self.step_retrieval_rate_after_first,
        )
        return out


class Retriever(ABC):
    """Owns a session's offloaded KV (in `store`), its working set and its counters."""

    method = "retrieval"

    def __init__(self, engine: Engine, store: TieredStore | None = None, **params: Any) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an engine.runner.Engine, got {type(engine).__name__}")
        self.engine = engine
        layout = KVLayout.for_spec(engine.spec).with_method(self.method, **params)
        self.units = UnitStore(store if store is not None else default_store(), layout)
        self.stats = RetrievalStats()
        self._step_retrieved = False

    @property
    def store(self) -> TieredStore:
        return self.units.store

    @property
    @abstractmethod
    def budget_bytes(self) -> int:
        """Upper bound on resident KV bytes once the context is offloaded."""

    @abstractmethod
    def attention(self, call: AttnCall) -> torch.Tensor:
        """The engine's attention function for this retriever's layers."""

    @abstractmethod
    def resident_bytes(self) -> int:
        """KV bytes in the working set now."""

    def use_store(self, store: TieredStore) -> None:
        """Read this session's KV from `store` from now on (e.g. the same disk folder reopened after a
        restart); ValueError if `store` does not hold it."""
        missing = [key for key in self.units.stored_keys() if not store.contains(key)]
        if missing:
            raise ValueError(
                f"store lacks {len(missing)} of this session's {len(self.units)} entries, e.g. {missing[0]}"
            )
        self.units.store = store

    def release(self) -> int:
        """Forget this session's KV in the store; returns how many entries were removed."""
        return self.units.release()

    def reset_stats(self) -> None:
        self.stats = RetrievalStats()
        self.units.traffic = Traffic()

    # ---- bookkeeping shared by the methods -------------------------------------------------------

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.retrieve_s += time.perf_counter() - start

    def count_layer_step(self, layer: int, retrieved: bool) -> None:
        """Called once per (layer, step); layer 0 opens a step."""
        s = self.stats
        if layer == 0:
            s.steps += 1
            self._step_retrieved = False
        s.layer_steps += 1
        if s.steps == 1:
            s.first_layer_steps += 1
            s.first_retrievals += retrieved
        if retrieved:
            s.retrievals += 1
            if not self._step_retrieved:
                s.retrieval_steps += 1
                self._step_retrieved = True

    def sync_stats(self) -> None:
        """Copy the store traffic and the resident size into `stats`."""
        t = self.units.traffic
        s = self.stats
        s.bytes_fetched, s.units_fetched, s.tokens_fetched = (
            t.bytes_fetched,
            t.units_fetched,
            t.tokens_fetched,
        )
        s.bytes_offloaded, s.units_offloaded = t.bytes_offloaded, t.units_offloaded
        s.resident_bytes = self.resident_bytes()
        s.peak_resident_bytes = max(s.peak_resident_bytes, s.resident_bytes)


def kv_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors if t is not None)
