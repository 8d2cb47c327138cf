"""CacheBlend selective recompute (EuroSys'25): fuse separately cached passages, recomputing a few rows.

Input `[prefix | passages | question]`: the prefix KV is exact (prefix cache), each passage's KV comes
from the store computed behind the prefix alone, the question has none. Layers before the first check
layer run a full fresh prefill of every row after the prefix. At a check layer the fresh K/V of the
current rows is compared with the cached K/V; the rows that deviate most (`ratio` of the cached rows)
plus every uncached row go on, the rest keep their cached K/V. Later layers compute only those rows and
attend over the cached context with the recomputed rows written in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from blend.rope import RopeShift
from blend.segments import LayerFeed, Placed
from engine.attention import AttentionFn, AttnCall, causal_attention
from engine.kvcache import KVCache
from engine.runner import Engine, LayerStep

DEVIATIONS = ("v", "k", "kv")
MASKS = ("exact", "bottom_right")


@dataclass
class BlendConfig:
    """How much to recompute and where to decide it.

    ratio: fraction of the cached rows recomputed (0.15 default; the paper sweeps 5-18%). A tuple gives
        one ratio per check layer, non-increasing (gradual filtering: later check layers re-rank within
        the current selection).
    check_layers: layers at which rows are (re)selected; layers before the first run a full prefill.
        Empty: no check layer; with ratio 0 that is full reuse (only uncached rows are computed).
    deviation: what is compared at a check layer: "v" (paper), "k" or "kv".
    mask: "exact" (a key is visible iff its position is not after the query's) or "bottom_right" (the
        official code's mask, which lets a selected mid-sequence row see later rows; for comparison).
    """

    ratio: float | tuple[float, ...] = 0.15
    check_layers: tuple[int, ...] = (1,)
    deviation: str = "v"
    mask: str = "exact"

    def __post_init__(self) -> None:
        self.check_layers = tuple(int(c) for c in self.check_layers)
        if list(self.check_layers) != sorted(set(self.check_layers)) or any(c < 0 for c in self.check_layers):
            raise ValueError(f"check_layers must be increasing layer indices >= 0, got {self.check_layers}")
        ratios = self.ratios
        if any(not 0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(f"ratio must lie in [0, 1], got {self.ratio}")
        if list(ratios) != sorted(ratios, reverse=True):
            raise ValueError(f"per-check-layer ratios must not increase, got {self.ratio}")
        if not self.check_layers and ratios[0] != 0.0:
            raise ValueError(
                f"without check layers nothing ranks the rows: ratio must be 0, got {self.ratio}"
            )
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")

    @property
    def ratios(self) -> tuple[float, ...]:
        if isinstance(self.ratio, (tuple, list)):
            if len(self.ratio) != max(len(self.check_layers), 1):
                raise ValueError(
                    f"{len(self.ratio)} ratios for {len(self.check_layers)} check layers {self.check_layers}"
                )
            return tuple(float(r) for r in self.ratio)
        return (float(self.ratio),) * max(len(self.check_layers), 1)

    def check_engine(self, num_layers: int) -> None:
        if self.check_layers and self.check_layers[-1] >= num_layers:
            raise ValueError(f"check layer {self.check_layers[-1]} is beyond the model's {num_layers} layers")


@dataclass
class BlendStats:
    rows: int = 0  # rows after the prefix
    cached_rows: int = 0
    recomputed: list[int] = field(default_factory=list)  # rows computed per layer
    selected: torch.Tensor | None = None  # prompt rows recomputed in the last layer

    def recompute_fraction(self) -> float:
        """Computed rows over all layers, as a fraction of a full prefill of the same rows."""
        return sum(self.recomputed) / max(self.rows * len(self.recomputed), 1)


class BlendHook:
    """The engine `LayerHook` that does the selection and the context replacement."""

    def __init__(self, config: BlendConfig, feed: LayerFeed, base: int, force_last: bool = True) -> None:
        self.config, self.feed, self.base = config, feed, base
        self.start = config.check_layers[0] if config.check_layers else 0
        self.force_last = force_last
        self.stats = BlendStats(rows=feed.rows)

    def __call__(self, step: LayerStep) -> None:
        self.stats.recomputed.append(int(step.q.shape[2]))
        if step.layer < self.start:
            return  # a full fresh prefill below the first check layer
        k, v = self.feed.layer(step.layer)
        rows = step.q_index - self.base  # the current rows, as indices into the feed's rows
        checking = step.layer in self.config.check_layers
        if checking or step.layer == self.start:
            keep = self._select(step, rows, k, v)
            step.keep = keep
        else:
            keep = None
        # At a check layer every current row's fresh K/V is known: use it. Elsewhere (and with no check
        # layer) only the rows that go on are written, so unselected rows keep their cached K/V.
        write = slice(None) if checking or keep is None else keep
        k[:, :, rows[write]] = step.k[:, :, write]
        v[:, :, rows[write]] = step.v[:, :, write]
        prefix = step.kv
        step.k_ctx = torch.cat([prefix.k, k], dim=2) if prefix.length else k
        step.v_ctx = torch.cat([prefix.v, v], dim=2) if prefix.length else v

    def _select(self, step: LayerStep, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Indices (into the current rows, ascending) of the rows that go on past this layer."""
        cached = self.feed.cached.to(rows.device)[rows]
        self.stats.cached_rows = int(self.feed.cached.sum())
        must = ~cached
        if self.force_last:
            must[-1] = True
        ratio = self._ratio(step.layer)
        budget = min(math.floor(ratio * self.stats.cached_rows + 0.5), int((cached & ~must).sum()))
        chosen = must.clone()
        if budget > 0:
            score = self._deviation(step, rows, k, v)
            score[~cached | must] = -math.inf
            chosen[torch.topk(score, budget).indices] = True
        keep = torch.nonzero(chosen).flatten()
        self.stats.selected = rows[keep] + self.base
        return keep

    def _ratio(self, layer: int) -> float:
        ratios = self.config.ratios
        return ratios[self.config.check_layers.index(layer)] if self.config.check_layers else ratios[0]

    def _deviation(
        self, step: LayerStep, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        d = torch.zeros(rows.numel(), device=rows.device)
        if "v" in self.config.deviation:
            d += (step.v[0] - v[0][:, rows]).float().pow(2).sum(dim=(0, 2))
        if "k" in self.config.deviation:
            d += (step.k[0] - k[0][:, rows]).float().pow(2).sum(dim=(0, 2))
        return d


def bottom_right_attention(call: AttnCall) -> torch.Tensor:
    """The official CacheBlend mask: the r selected queries are aligned to the last r keys, so a selected
    row in mid-sequence may see keys after it. Kept only to compare with the exact mask."""
    rows, k_rows = call.q.shape[-2], call.k.shape[-2]
    aligned = torch.arange(k_rows - rows, k_rows, device=call.q_index.device)
    return causal_attention(
        AttnCall(call.layer, call.q, call.k, call.v, aligned, call.q_positions, call.scale, call.kv)
    )


def mask_attention(mask: str) -> AttentionFn:
    """The attention function of a `BlendConfig.mask`."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return causal_attention if mask == "exact" else bottom_right_attention


@dataclass
class BlendOutput:
    logits: torch.Tensor  # [vocab] next-token logits after the last prompt row
    cache: KVCache  # the fused cache: decoding continues from it
    stats: BlendStats
    feed: LayerFeed


def blend(
    engine: Engine,
    ids: Sequence[int],
    prefix: KVCache,
    feed: LayerFeed,
    config: BlendConfig,
    logits: str = "last",
    positions: torch.Tensor | None = None,
    attention: AttentionFn | None = None,
) -> BlendOutput:
    """Fuse `ids` (the whole prompt; `prefix` holds the KV of its first `len(prefix)` rows, exactly)
    from the feed's cached passages with selective recompute. `prefix` becomes the fused cache.

    `positions` of the rows after the prefix default to sequential; `attention` (one function for every
    layer from the first check layer on) replaces the exact/bottom-right mask (APE uses this).
    """
    config.check_engine(len(engine.layers))
    base = len(prefix)
    if feed.base != base or feed.rows != len(ids) - base:
        raise ValueError(f"the feed covers rows {feed.base}+{feed.rows}, the prompt {base}+{len(ids) - base}")
    hook = BlendHook(config, feed, base)
    attention = attention or mask_attention(config.mask)
    per_layer = dict.fromkeys(range(hook.start, len(engine.layers)), attention)
    try:
        out = engine.forward(
            list(ids[base:]), cache=prefix, positions=positions, hook=hook, attention=per_layer, logits=logits
        )
    finally:
        feed.close()
    return BlendOutput(out.logits[0, -1] if logits == "last" else out.logits[0], out.cache, hook.stats, feed)


def place(starts: Sequence[int], passages: Sequence[Sequence[int]]) -> list[Placed]:
    return [Placed(s, list(p)) for s, p in zip(starts, passages, strict=True)]


def make_feed(engine: Engine, connector, placed: Sequence[Placed], base: int, rows: int, **kw) -> LayerFeed:
    """A `LayerFeed` for an engine's device and RoPE."""
    return LayerFeed(connector, RopeShift.for_engine(engine), placed, base, rows, engine.device, **kw)
