"""LouisKV (arXiv 2510.11292): retrieve KV only when the query moves, in semantic units, for long inputs
and long outputs.

After a full prefill, each layer keeps `n_sink` first tokens and a local window of recent tokens resident
and offloads the rest to the kvstore as units: the prompt's middle as k-means clusters of keys per KV head
(`cluster_tokens` per cluster on average), generated tokens as segments cut where the query shifts (at
least `min_segment`, at most `max_segment` tokens) once they leave the window. A unit is represented by
its mean key.

At each decode step and layer, `r_t` = mean over query heads of cos(q_{t-1}, q_t) (the post-RoPE query
rows the engine hands over; trigger "anchor" compares with the query of the layer's last retrieval
instead). When `r_t < tau` (the layer's own tau when `tau` is a tuple; and at the first step) the layer
re-selects: per KV head, units by group-consistent score until the budget
is full (units already resident stay; only new ones are fetched). Otherwise the last selection is reused.
Attention is exact over sinks + selected units + local window at the tokens' original positions.

With `scope="step"` (not in the paper) one decision serves a whole decode step: layers run in order, so
it can only come from the first `step_layers` layers' queries; a layer among them retrieves once it or an
earlier one falls below its tau, and every later layer follows the decision of those first layers.

With `trigger="periodic"` (a baseline, not in the paper) every layer re-selects at the first step and at
every `period`-th step after it, whatever the queries do: the control that tells whether the query
trigger's timing is worth anything over a fixed schedule at the same rate.

`budget` counts every resident token per layer and KV head: sinks + local window + selected units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttnCall
from engine.kvcache import KVCache, LayerKV
from engine.runner import Engine
from kvstore.store import TieredStore
from retrieval.base import Retriever, kv_bytes
from retrieval.calibrate import TRIGGERS
from retrieval.kmeans import groups, kmeans
from retrieval.offload import Unit
from retrieval.subset import subset_attention
from retrieval.units import PoolSnapshot, UnitPool
from retrieval.working import WorkingSet

# Calibrated for SmolLM2-135M-Instruct with `calibrate_tau` (trigger "adjacent", target 30%, 3 MuSiQue
# passage prompts of ~1K tokens, 96 tokens decoded each): one tau per layer. A single tau (0.8: 25% of
# (layer, step) pairs overall) retrieved on 41-79% of the steps of layers 0-11 and 0-20% of layers 12-29,
# whose selections went stale. Calibrate again for another model (a tuple of another length is refused).
DEFAULT_TAU = (
    0.70, 0.75, 0.73, 0.78, 0.74, 0.77, 0.78, 0.74, 0.74, 0.76, 0.81, 0.79, 0.88, 0.90, 0.86,
    0.88, 0.91, 0.85, 0.86, 0.91, 0.85, 0.88, 0.87, 0.83, 0.82, 0.86, 0.83, 0.86, 0.84, 0.83,
)  # fmt: skip
# The same calibration on short answers, the decode the accuracy probes make: 12 MuSiQue questions over
# their own passages (items 100-111, 3.6-3.8K tokens; the probes draw passages from items 0-59 only), 16
# tokens decoded, target 30% counting the mandatory first-step retrieval (`include_first=True`). On those
# decodes DEFAULT_TAU retrieved on 43% of (layer, step) pairs after the first step and 46% with it, about
# evenly over the answer (44% at steps 1-4, 42% at steps 5-14): these decodes move the query more than the
# 96-token summaries DEFAULT_TAU was calibrated on, at every step, not only at the start. Reproduce with
# calibrate_tau(engine, qa_prompts(tokenizer, 4096, slice(100, 112)), 16, 0.3, trigger="adjacent",
# include_first=True).layer_taus.
ANSWER_TAU = (
    0.63, 0.73, 0.68, 0.75, 0.68, 0.71, 0.72, 0.69, 0.70, 0.74, 0.80, 0.78, 0.87, 0.87, 0.81,
    0.84, 0.90, 0.82, 0.85, 0.90, 0.81, 0.83, 0.84, 0.78, 0.75, 0.84, 0.80, 0.83, 0.80, 0.81,
)  # fmt: skip
# The same short-answer calibration for the "anchor" trigger (cos with the query of the layer's last
# retrieval): calibrate_tau(engine, qa_prompts(tokenizer, 4096, slice(100, 112)), 16, 0.3,
# trigger="anchor", include_first=True).layer_taus.
ANCHOR_TAU = (
    0.61, 0.65, 0.63, 0.70, 0.63, 0.67, 0.67, 0.65, 0.65, 0.69, 0.73, 0.69, 0.82, 0.82, 0.75,
    0.80, 0.83, 0.76, 0.78, 0.82, 0.74, 0.77, 0.77, 0.72, 0.69, 0.79, 0.76, 0.77, 0.75, 0.74,
)  # fmt: skip
# The step-level trigger (scope="step", not in the paper): layer 0 decides for all layers, calibrated on
# ANSWER_TAU's decodes with the first step counted (0.29 of steps, 0.24 after the first; 0.69 if the first
# is not counted: 0.34 / 0.30). Deciding from 2-10 layers or with the anchor trigger gave the same
# staleness of the selections (mean cos of a layer's query with its query at its last retrieval,
# 0.83-0.84), as did retrieving every 4th step: bench/results/retrieval-2026-12-02/step_calibration.py.
# Reproduce with calibrate_tau(engine, qa_prompts(tokenizer, 4096, slice(100, 112)), 16, 0.3, taus,
# trigger="adjacent", include_first=True, scope="step").tau, taus = -0.5, -0.49, .., 0.99.
STEP_TAU = 0.63
STEP_TRIGGER = "adjacent"
STEP_LAYERS = 1
DEFAULT_TRIGGER = "adjacent"
SCOPES = ("layer", "step")
LOUISKV_TRIGGERS = (*TRIGGERS, "periodic")  # "periodic" has no tau to calibrate
# Decode steps between periodic retrievals: 4 gives 4 of the 15 steps of a 16-token answer (0.27),
# the rate the query triggers were calibrated to (0.30).
DEFAULT_PERIOD = 4


@dataclass
class LouisKVConfig:
    """budget: resident tokens per layer and KV head (sinks + window + retrieved units).
    tau: retrieve when the trigger's cosine falls below it (> 1: every step; < -1: only the first); one
        number, or one per layer (the default, calibrated for SmolLM2-135M by `calibrate_tau`).
    trigger: "adjacent" (cos(q_{t-1}, q_t), the paper's), "anchor" (cos with the query of the layer's
        last retrieval, so a slow drift also triggers) or "periodic" (every `period` steps, tau unused).
    period: decode steps between retrievals of the periodic trigger (the first step always retrieves).
    n_sink / window: always-resident first tokens and recent tokens.
    cluster_tokens: mean tokens per k-means unit of the prompt (4: on SmolLM2-135M, 256 tokens after a
        1,235-token prompt at budget 512 retrieving every step followed the full cache for 43 tokens with
        4-token units, 11 with 8 and 5 with 16, vs 53 for the exact top-512 tokens: a unit's mean key
        hides the few keys a query needs among its other members); max_unit: larger clusters are split.
    min_segment / max_segment: length range of a generated-token segment (max_segment <= window).
    kmeans_iters: Lloyd iterations (stops early when labels settle).
    follow: each selected unit brings the units holding the `follow` tokens after each of its members
        (0: the paper's selection). Not in the paper: copying a number out of the prompt moves to the
        next token at every step while the query barely changes, so the trigger does not fire and a
        selection of k-means units (which split the number across clusters) lacks the later digits.
    scope: "layer" (the paper's: each layer decides at each step) or "step" (one decision per step for
        all layers, from the first `step_layers` layers' triggers: layer j < step_layers retrieves when
        any layer <= j is below its tau, later layers when any of the first `step_layers` is; not in the
        paper: a per-layer trigger at 30% of (layer, step) pairs still has some layer retrieving on most
        steps, so every step pays a fetch)."""

    budget: int = 512
    tau: float | tuple[float, ...] = DEFAULT_TAU
    trigger: str = DEFAULT_TRIGGER
    period: int = DEFAULT_PERIOD
    n_sink: int = 4
    window: int = 64
    cluster_tokens: int = 4
    max_unit: int = 64
    min_segment: int = 4
    max_segment: int = 32
    kmeans_iters: int = 10
    follow: int = 0
    scope: str = "layer"
    step_layers: int = 1

    def __post_init__(self) -> None:
        sizes = ("budget", "window", "cluster_tokens", "max_unit", "min_segment", "max_segment")
        for name in (*sizes, "step_layers", "period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LouisKVConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("n_sink", "follow"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LouisKVConfig.{name} must be an int >= 0, got {value!r}")
        taus = self.tau if isinstance(self.tau, (tuple, list)) else (self.tau,)
        if not taus or any(not isinstance(t, (int, float)) or isinstance(t, bool) or t != t for t in taus):
            raise ValueError(f"LouisKVConfig.tau must be a number or one per layer, got {self.tau!r}")
        if isinstance(self.tau, list):
            self.tau = tuple(self.tau)
        if self.trigger not in LOUISKV_TRIGGERS:
            raise ValueError(f"LouisKVConfig.trigger must be one of {LOUISKV_TRIGGERS}, got {self.trigger!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"LouisKVConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.max_segment > self.window or self.min_segment > self.max_segment:
            raise ValueError(
                f"need min_segment <= max_segment <= window, got {self.min_segment}, "
                f"{self.max_segment}, {self.window}"
            )
        if self.selection < 1:
            raise ValueError(
                f"LouisKVConfig.budget {self.budget} leaves no room for retrieved units after "
                f"n_sink {self.n_sink} + window {self.window}"
            )

    def layer_tau(self, layer: int) -> float:
        return self.tau[layer] if isinstance(self.tau, tuple) else self.tau

    @property
    def selection(self) -> int:
        """Tokens per layer and KV head left for retrieved units."""
        return self.budget - self.n_sink - self.window


class LouisKV(Retriever):
    """Generation with LouisKV through the engine: `generate(ids, n)` or `prefill` + `engine.decode`."""

    method = "louiskv"

    def __init__(
        self, engine: Engine, config: LouisKVConfig | None = None, store: TieredStore | None = None
    ) -> None:
        self.config = config or LouisKVConfig()
        if not isinstance(self.config, LouisKVConfig):
            raise TypeError(f"config must be a LouisKVConfig, got {type(self.config).__name__}")
        taus, layers = self.config.tau, engine.spec.num_layers
        if isinstance(taus, tuple) and len(taus) != layers:
            raise ValueError(f"LouisKVConfig.tau has {len(taus)} values for a {layers}-layer model")
        if self.config.step_layers > layers:
            raise ValueError(f"LouisKVConfig.step_layers {self.config.step_layers} > {layers} layers")
        super().__init__(engine, store, cluster_tokens=self.config.cluster_tokens)
        self.layers: list[LouisKVLayer] = []
        self.labels: list[torch.Tensor] = []  # k-means labels per layer of the last offload
        self.prompt_units: list[PoolSnapshot] = []  # per layer, the prompt's units (for `units_from`)
        self._step_fired = False  # scope "step": the current step's decision so far

    @property
    def budget_bytes(self) -> int:
        return self.config.budget * self.engine.spec.kv_bytes_per_token

    def resident_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def prefill(self, ids: torch.Tensor | list[int]) -> tuple[KVCache, torch.Tensor]:
        """Full prefill of `ids`, then offload; returns the managed cache and the next-token logits."""
        out = self.engine.forward(ids)
        return self.offload(out.cache), out.logits[0, -1]

    def offload(
        self, cache: KVCache, labels: list[torch.Tensor] | None = None, units_from: LouisKV | None = None
    ) -> KVCache:
        """Replace each dense layer of a batch-1 `cache` by a LouisKV layer (in place; returns it).

        `labels`: the k-means labels per layer of another LouisKV's `offload` of the same prompt (its
        `labels`), valid when `n_sink`, `window`, `cluster_tokens` and `kmeans_iters` are the same (the
        clustering is deterministic and does not depend on budget or tau): skips the clustering.
        `units_from`: such a LouisKV on the same store, whose prompt units this one then reads instead of
        writing its own copies (skips the clustering and the puts, most of an offload's time on long
        prompts; the other must not `release` before this one is done)."""
        if not cache.layers or cache.layers[0].k.shape[0] != 1:
            raise ValueError("LouisKV manages a non-empty batch-1 cache")
        if any(isinstance(layer, LouisKVLayer) for layer in cache.layers):
            raise ValueError("this cache is already managed by a retriever")
        if units_from is not None:
            self._check_shareable(units_from, len(cache.layers))
            labels = units_from.labels
        if labels is not None and len(labels) != len(cache.layers):
            raise ValueError(f"labels has {len(labels)} layers, the cache {len(cache.layers)}")
        with self.timed():
            self.labels = []
            self.layers = [
                self._layer(
                    i,
                    lay,
                    cache.positions,
                    None if labels is None else labels[i],
                    None if units_from is None else units_from.prompt_units[i],
                )
                for i, lay in enumerate(cache.layers)
            ]
        self.prompt_units = [layer.pool.snapshot() for layer in self.layers]
        cache.layers = list(self.layers)
        self.sync_stats()
        return cache

    def _check_shareable(self, other: LouisKV, layers: int) -> None:
        fields = ("n_sink", "window", "cluster_tokens", "max_unit", "max_segment", "kmeans_iters")
        differ = [f for f in fields if getattr(other.config, f) != getattr(self.config, f)]
        if differ or other.store is not self.store or len(other.prompt_units) != layers:
            raise ValueError(
                "units_from must have offloaded the same prompt into the same store with the same "
                f"{', '.join(fields)} (differ: {differ or 'store or prompt'})"
            )

    def generate(
        self, ids: torch.Tensor | list[int], max_new_tokens: int, stop: set[int] | None = None
    ) -> list[int]:
        """Greedy generation: full prefill, offload, decode with retrieval."""
        cache, logits = self.prefill(ids)
        new, _ = self.engine.decode(logits, cache, max_new_tokens, attention=self.attention, stop=stop)
        return new

    def attention(self, call: AttnCall) -> torch.Tensor:
        layer = call.kv
        if not isinstance(layer, LouisKVLayer) or layer.owner is not self:
            raise TypeError("LouisKV.attention needs a cache offloaded by this LouisKV (see offload())")
        out = layer.attend(call)
        if call.layer == len(self.layers) - 1:
            self.sync_stats()
        return out

    def decide(self, layer: int, below_tau: bool) -> bool:
        """Whether `layer` retrieves at this step, given whether its own trigger fired."""
        if self.config.scope == "layer":
            return below_tau
        if layer == 0:  # layers run in order: layer 0 opens a step
            self._step_fired = False
        if layer < self.config.step_layers:
            self._step_fired = self._step_fired or below_tau
        return self._step_fired

    def _layer(
        self,
        i: int,
        dense: LayerKV,
        positions: torch.Tensor,
        labels: torch.Tensor | None,
        shared: PoolSnapshot | None = None,
    ) -> LouisKVLayer:
        layer = LouisKVLayer(self, i, dense.k, dense.v, positions)
        if shared is not None and labels is not None:
            layer.pool.restore(shared)
            self.labels.append(labels)
            return layer
        middle = slice(layer.sink_k.shape[2], layer.local_start)
        k, v = dense.k[0, :, middle], dense.v[0, :, middle]
        if labels is None:
            labels = kmeans(k, -(-k.shape[1] // self.config.cluster_tokens), self.config.kmeans_iters)
        elif tuple(labels.shape) != tuple(k.shape[:2]):
            raise ValueError(f"layer {i}: labels of shape {tuple(labels.shape)} for {tuple(k.shape[:2])}")
        self.labels.append(labels)
        self._offload_clusters(layer, k, v, positions[middle], labels)
        return layer

    def _offload_clusters(
        self, layer: LouisKVLayer, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor
    ) -> None:
        cfg = self.config
        if k.shape[1] == 0:
            return
        for h in range(k.shape[0]):
            for members in groups(labels[h], cfg.max_unit):
                layer.offload_unit(h, Unit(k[h, members], v[h, members], pos[members]))


class LouisKVLayer(LayerKV):
    """One layer under LouisKV: `k`/`v` hold the local window; sinks and retrieved units sit beside it."""

    def __init__(
        self, owner: LouisKV, index: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> None:
        cfg = owner.config
        tokens = k.shape[2]
        sink_end = min(cfg.n_sink, tokens)
        self.local_start = max(sink_end, tokens - cfg.window)
        super().__init__(k[:, :, self.local_start :].clone(), v[:, :, self.local_start :].clone())
        self.owner, self.index = owner, index
        self.sink_k, self.sink_v = k[:, :, :sink_end].clone(), v[:, :, :sink_end].clone()
        self.local_positions = positions[self.local_start :].clone()
        self.next_position = positions[-1] + 1
        # The prompt's tail is cut into closed segments so it can leave the window like generated text.
        ends = list(range(self.local_start + cfg.max_segment, tokens, cfg.max_segment)) + [tokens]
        starts = [self.local_start, *ends[:-1]]
        self.closed = [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]
        self.open_start = tokens
        heads, head_dim = k.shape[1], k.shape[3]
        self.pool = UnitPool(heads, head_dim, k.device)
        self.working = WorkingSet(heads, head_dim, k.dtype, k.device)
        # per KV head, resident units by priority (best first): the last selection's order, with segments
        # that left the window since then in front (recent text stays until the next retrieval)
        self.priority: list[list[int]] = [[] for _ in range(heads)]
        self.q_ref: torch.Tensor | None = None  # the trigger's reference query (see LouisKVConfig.trigger)
        self.steps = 0  # decode steps this layer attended

    @property
    def heads(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return kv_bytes(self.k, self.v, self.sink_k, self.sink_v) + self.working.nbytes()

    # ---- the engine's calls ----------------------------------------------------------------------

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one decoded token to the local window (making room first, so it never overflows)."""
        if k.shape[2] != 1:
            raise ValueError(
                f"a LouisKV layer decodes one token per step, got {k.shape[2]} rows; prefill longer "
                "inputs with the full cache and offload()"
            )
        cfg = self.owner.config
        while self.length + 1 > cfg.window:
            self._evict_oldest_segment()
        token = self.local_start + self.length
        super().update(k, v)
        # The engine decodes at consecutive positions (its default), so the new row's is the next one.
        self.local_positions = torch.cat([self.local_positions, self.next_position.view(1)])
        self.next_position = self.next_position + 1
        if token + 1 - self.open_start >= cfg.max_segment:
            self.closed.append((self.open_start, token + 1))
            self.open_start = token + 1
        return self.k, self.v

    def attend(self, call: AttnCall) -> torch.Tensor:
        cfg = self.owner.config
        q = call.q[0, :, -1]  # [heads, d]
        retrieve = self.owner.decide(self.index, self._fires(q))
        if retrieve:
            if self.steps > 0:  # the prompt's tail is already cut into segments: no boundary at step 0
                self._boundary()
            with self.owner.timed():
                self._retrieve(q, call.scale)
        if retrieve or cfg.trigger == "adjacent":
            self.q_ref = q.clone()
        self.owner.count_layer_step(self.index, retrieve)
        self.steps += 1
        return self._attend(call)

    def _fires(self, q: torch.Tensor) -> bool:
        """This layer's own trigger at this step (the first step always fires)."""
        cfg = self.owner.config
        if cfg.trigger == "periodic":
            return self.steps % cfg.period == 0
        if self.q_ref is None:
            return True
        r = float(torch.cosine_similarity(self.q_ref, q, dim=-1).mean())
        return r < cfg.layer_tau(self.index)

    # ---- internals -----------------------------------------------------------------------------

    def _attend(self, call: AttnCall) -> torch.Tensor:
        w = self.working
        k = torch.cat([self.sink_k, w.k, self.k], dim=2)
        v = torch.cat([self.sink_v, w.v, self.v], dim=2)
        valid = None
        if w.valid is not None:
            ones = torch.ones(self.heads, 1, dtype=torch.bool, device=k.device)
            sinks, local = ones.expand(-1, self.sink_k.shape[2]), ones.expand(-1, self.length)
            valid = torch.cat([sinks, w.valid, local], dim=1)
        return subset_attention(call.q, k, v, valid, call.scale)

    def _boundary(self) -> None:
        """The query shifted: the current token opens a new segment (if the open one is long enough)."""
        token = self.local_start + self.length - 1
        if token - self.open_start >= self.owner.config.min_segment:
            self.closed.append((self.open_start, token))
            self.open_start = token

    def _retrieve(self, q: torch.Tensor, scale: float) -> None:
        cfg = self.owner.config
        chosen = self.pool.select(q, scale, cfg.selection, cfg.follow)
        self.priority = [list(ids) for ids in chosen]
        keep, new = [], []
        for h, ids in enumerate(chosen):
            have = self.working.units(h)
            keep.append(have & set(ids))
            new.append([(u, self.owner.units.get(self.pool.keys[h][u])) for u in ids if u not in have])
            self.owner.stats.tokens_selected += sum(self.pool.size(h, u) for u in ids)
        self.working.rebuild(keep, new)

    def _evict_oldest_segment(self) -> None:
        """Move the oldest closed segment out of the window: into the store, and into the working set
        too, making room there by dropping the lowest-priority retrieved units. Between retrievals the
        segment would otherwise vanish from attention (the working set is full after a selection) while
        the selection made for an older query stays; a budget that holds everything never drops any."""
        assert self.closed and self.closed[0][0] == self.local_start, "window holds no closed segment"
        start, end = self.closed.pop(0)
        n = end - start
        seg_k, seg_v, seg_pos = self.k[0, :, :n], self.v[0, :, :n], self.local_positions[:n]
        keep, new = [], []
        for h in range(self.heads):
            unit = Unit(seg_k[h].clone(), seg_v[h].clone(), seg_pos.clone())
            uid = self.offload_unit(h, unit)
            have = self.working.units(h)
            drop = self._lowest(h, have, self.working.tokens(h) + n - self.owner.config.selection)
            if drop is None:  # the segment alone exceeds the room for units
                keep.append(have)
                new.append([])
                continue
            keep.append(have - drop)
            new.append([(uid, unit)])
            self.priority[h] = [uid] + [u for u in self.priority[h] if u not in drop]
        self.working.rebuild(keep, new)
        self.k, self.v = self.k[:, :, n:], self.v[:, :, n:]
        self.local_positions = self.local_positions[n:]
        self.local_start = end

    def _lowest(self, head: int, have: set[int], excess: int) -> set[int] | None:
        """Resident units of `head` to drop, lowest priority first, to free `excess` tokens (None: not
        possible)."""
        drop: set[int] = set()
        for u in reversed(self.priority[head]):
            if excess <= 0:
                break
            if u in have:
                drop.add(u)
                excess -= self.pool.size(head, u)
        return drop if excess <= 0 else None

    def offload_unit(self, head: int, unit: Unit) -> int:
        uid = len(self.pool.keys[head])
        key = self.owner.units.key(self.index, head, uid)
        self.owner.units.put(key, unit, layer=self.index, head=head)
        return self.pool.add(head, key, unit.k, unit.positions)
