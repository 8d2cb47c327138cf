"""Passage KV: computed once behind the shared prefix, stored under its segment key, read back per layer.

A passage's KV depends on what it was computed behind, so the connector used here should have the
prefix in its namespace salt (see `blend.pipeline`). Stored keys stay at the positions they were
computed at (`|prefix|..`); `LayerFeed` moves them to wherever the passage lands in a prompt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from blend.rope import RopeShift
from engine.kvcache import KVCache
from engine.runner import Engine
from kvstore.connector import KVConnector


@dataclass
class Placed:
    """A cached passage placed at prompt rows [start, start + len(ids)), at RoPE positions from
    `position` (default: `start`, i.e. sequential; APE puts every passage at the same position)."""

    start: int
    ids: list[int]
    position: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def encode_segment(engine: Engine, prefix: KVCache, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """KV `[layers, 2, tokens, kv_heads, head_dim]` and positions of `ids` computed right after `prefix`."""
    cache = prefix.clone()  # the prefix is shared by every passage: never extend it in place
    engine.forward(list(ids), cache=cache, logits="none")
    start = len(prefix)
    return cache.to_chunk(start).cpu(), cache.positions[start:].cpu()


def ensure_segments(
    engine: Engine, connector: KVConnector, prefix: KVCache, passages: Sequence[Sequence[int]]
) -> list[bool]:
    """Compute and store every passage the store lacks; True where a passage was already stored."""
    had = []
    for ids in passages:
        present = connector.has_segment(ids)
        if not present:
            kv, positions = encode_segment(engine, prefix, ids)
            connector.put_segment(ids, kv, positions)
        had.append(present)
    return had


@dataclass
class FeedStats:
    fetched_bytes: int = 0
    fetch_s: float = 0.0  # time the loader spent reading entries from their tiers
    wait_s: float = 0.0  # time the compute side waited for a layer (0 when loading is hidden)
    missing: list[int] = field(default_factory=list)  # passages that vanished between check and fetch


class LayerFeed:
    """Per-layer cached context `[1, kv_heads, rows, head_dim]` for prompt rows [base, base + rows).

    A worker thread reads each passage's entry from the store, then assembles layer 0, 1, ... in order
    (keys re-positioned, values copied), so that layer i+1 is prepared while the engine computes layer
    i. Rows no passage covers stay zero: the caller always recomputes them.
    """

    def __init__(
        self,
        connector: KVConnector,
        rope: RopeShift,
        placed: Sequence[Placed],
        base: int,
        rows: int,
        device: torch.device,
        background: bool = True,
    ) -> None:
        layout = connector.layout
        self.connector, self.rope, self.placed = connector, rope, list(placed)
        self.base, self.rows, self.device = base, rows, device
        self.num_layers = layout.num_layers
        self.shape = (1, layout.num_kv_heads, rows, layout.head_dim)
        self.dtype = layout.dtype
        self.stats = FeedStats()
        self._k: list[torch.Tensor | None] = [None] * self.num_layers
        self._v: list[torch.Tensor | None] = [None] * self.num_layers
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._error: BaseException | None = None
        self.cached = torch.zeros(rows, dtype=torch.bool)
        for p in self.placed:
            if p.end > base + rows or p.start < 0:
                raise ValueError(f"passage rows [{p.start}, {p.end}) fall outside [0, {base + rows})")
            self.cached[max(p.start - base, 0) : max(p.end - base, 0)] = True
        self._thread = threading.Thread(target=self._run, name="blend-layer-feed", daemon=True)
        if background:
            self._thread.start()
        else:
            self._run()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's cached K and V (owned by the caller: write into them freely)."""
        if not self._ready[i].is_set():
            t0 = time.perf_counter()
            self._ready[i].wait()
            self.stats.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        k, v = self._k[i], self._v[i]
        self._k[i] = self._v[i] = None  # the caller owns them now; keep no second reference
        assert k is not None and v is not None
        return k, v

    def close(self) -> None:
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            entries = self._fetch()
            for i in range(self.num_layers):
                self._k[i], self._v[i] = self._assemble(i, entries)
                self._ready[i].set()
        except BaseException as e:  # surfaced to the compute side by layer()
            self._error = e
        finally:
            for event in self._ready:
                event.set()

    def _fetch(self) -> list[tuple[Placed, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        t0 = time.perf_counter()
        out = []
        for j, p in enumerate(self.placed):
            if p.end <= self.base:
                continue  # wholly inside the exact prefix
            key = self.connector.namespace.segment_key(p.ids)
            # copy=False: these tensors are only read (rotation and copy make new ones)
            entry = self.connector.kvstore.get(key, copy=False)
            # an entry without positions (stored by hand, not by encode_segment) cannot be re-rotated:
            # recomputed like a missing one rather than guessed
            if entry is None or entry.positions is None:
                self.stats.missing.append(j)
                self.cached[max(p.start - self.base, 0) : max(p.end - self.base, 0)] = False
                continue
            kv = entry.kv.to(self.device)
            first = p.start if p.position is None else p.position
            new = torch.arange(first, first + len(p.ids))
            delta = new - entry.positions.cpu().long()
            out.append((p, kv, self.rope.cos_sin(delta, self.device)))
            self.stats.fetched_bytes += kv.nelement() * kv.element_size()
        self.stats.fetch_s = time.perf_counter() - t0
        return out

    def _assemble(self, i: int, entries) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for p, kv, (cos, sin) in entries:
            # a passage may start inside the exact prefix (a longer cached prefix): use only its tail
            skip = max(self.base - p.start, 0)
            if skip >= len(p.ids):
                continue
            s, e = p.start + skip - self.base, p.end - self.base
            # stored [tokens, heads, dim] -> [heads, tokens, dim]
            keys = kv[i, 0, skip:].transpose(0, 1)
            k[0, :, s:e] = self.rope.rotate(keys, cos[skip:], sin[skip:])
            v[0, :, s:e] = kv[i, 1, skip:].transpose(0, 1)
        return k, v
