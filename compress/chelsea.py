"""Chelsea / CentroidKV: chunked soft matching of keys, merged into size-weighted centroids (arXiv 2506.11418).

Per layer and KV head: the first `sinks` and last `recent` tokens stay as they are; the rest is cut into
chunks of `chunk` tokens. Inside a chunk, even offsets form set A and odd offsets set B; each a picks its
most cosine-similar b (keys only), and the `r` best edges are merged (several a may join one b): the
centroid is the size-weighted mean of the keys and of the values, with its size m kept, at b's slot.
Passes repeat on the survivors (re-partitioned A/B by slot) until each chunk holds `keep * chunk` tokens;
a pass merges as many edges as it can (up to |A|), so keep 0.5 is one pass, 0.25 two. A leftover shorter
than a chunk joins the recent tail and is merged once decode fills it (see TokenSetLayer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress.base import Compressor, check_count, check_keep, register
from compress.tokenset import TokenSetLayer


@dataclass
class Merge:
    """Survivors of one chunk batch: keys, values, sizes and original slots, `[N, n, ...]`."""

    k: torch.Tensor
    v: torch.Tensor
    m: torch.Tensor
    slot: torch.Tensor

    def take(self, index: torch.Tensor) -> Merge:
        def pick(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))

        return Merge(pick(self.k), pick(self.v), self.m.gather(1, index), self.slot.gather(1, index))


def merge_pass(state: Merge, r: int) -> Merge:
    """Merge the `r` most similar a->b edges of every row; returns the survivors in slot order."""
    a = state.take(torch.arange(0, state.k.shape[1], 2, device=state.k.device).expand(state.k.shape[0], -1))
    b = state.take(torch.arange(1, state.k.shape[1], 2, device=state.k.device).expand(state.k.shape[0], -1))
    sim = F.normalize(a.k.float(), dim=-1) @ F.normalize(b.k.float(), dim=-1).transpose(1, 2)
    best, target = sim.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
    into = target.gather(1, merged)
    joined = a.take(merged)
    b_m = b.m.scatter_add(1, into, joined.m)
    b_k = _weighted_sum(b, joined, into, "k") / b_m[..., None]
    b_v = _weighted_sum(b, joined, into, "v") / b_m[..., None]
    survivors = _cat(a.take(kept), Merge(b_k, b_v, b_m, b.slot))
    return survivors.take(survivors.slot.argsort(dim=1))


def _weighted_sum(b: Merge, joined: Merge, into: torch.Tensor, name: str) -> torch.Tensor:
    x, y = getattr(b, name), getattr(joined, name)
    total = x * b.m[..., None].to(x.dtype)
    index = into[..., None].expand(*into.shape, x.shape[-1])
    return total.scatter_add(1, index, y * joined.m[..., None].to(y.dtype))


def _cat(x: Merge, y: Merge) -> Merge:
    return Merge(*(torch.cat([getattr(x, f), getattr(y, f)], dim=1) for f in ("k", "v", "m", "slot")))


def merge_chunks(k: torch.Tensor, v: torch.Tensor, target: int) -> Merge:
    """Merge each chunk of `k`/`v` `[N, c, d]` down to `target` tokens by repeated soft-matching passes."""
    n, c, _ = k.shape
    slot = torch.arange(c, device=k.device).expand(n, c)
    state = Merge(k, v, torch.ones(n, c, dtype=k.dtype, device=k.device), slot)
    while state.k.shape[1] > target:
        size = state.k.shape[1]
        state = merge_pass(state, min(size - target, (size + 1) // 2))
    return state


@register
@dataclass
class Chelsea(Compressor):
    """keep: fraction of each chunk's tokens kept (0.25 = 75% fewer in the merged region; 1 = none merged).
    chunk: tokens per chunk (32). sinks / recent: first and last tokens kept as they are (4 / 32).
    size_aware: add `log m` to a centroid's logit (ToMe's proportional attention)."""

    method: ClassVar[str] = "chelsea"
    keep: float = 0.25
    chunk: int = 32
    sinks: int = 4
    recent: int = 32
    size_aware: bool = True

    def __post_init__(self) -> None:
        check_count("chunk", self.chunk, low=2)
        check_count("sinks", self.sinks)
        check_count("recent", self.recent)
        if not isinstance(self.size_aware, bool):
            raise TypeError(f"size_aware must be a bool, got {self.size_aware!r}")
        self.keep = check_keep(self.keep)
        if self.target < 1:
            raise ValueError(
                f"keep={self.keep} leaves no token of a {self.chunk}-token chunk; "
                f"the smallest usable keep is {0.5 / self.chunk:.4f}"
            )

    @property
    def target(self) -> int:
        """Tokens each chunk keeps."""
        return int(self.keep * self.chunk + 0.5)

    def merge(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunks `[b, h, n, chunk, d]` -> merged `[b, h, n*target, d]` keys and values, and sizes."""
        b, h, n, c, d = k.shape
        out = merge_chunks(k.reshape(-1, c, d), v.reshape(-1, c, d), self.target)
        return out.k.reshape(b, h, -1, d), out.v.reshape(b, h, -1, d), out.m.reshape(b, h, -1)

    def compress(
        self,
        module: nn.Module | None,
        hidden_states: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> TokenSetLayer:
        b, h, t, d = keys.shape
        sinks = min(self.sinks, t)
        chunks = max(t - sinks - self.recent, 0) // self.chunk
        end = sinks + chunks * self.chunk
        mid = (sinks, end)
        k_mid = keys[:, :, mid[0] : mid[1]].reshape(b, h, chunks, self.chunk, d)
        v_mid = values[:, :, mid[0] : mid[1]].reshape(b, h, chunks, self.chunk, d)
        k_m, v_m, size = self.merge(k_mid, v_mid)
        return TokenSetLayer(
            k=keys[:, :, end:].contiguous(),
            v=values[:, :, end:].contiguous(),
            k_set=torch.cat([keys[:, :, :sinks], k_m], dim=-2).contiguous(),
            v_set=torch.cat([values[:, :, :sinks], v_m], dim=-2).contiguous(),
            size=torch.cat([keys.new_ones(b, h, sinks), size], dim=-1).contiguous(),
            total=t,
            size_aware=self.size_aware,
            merger=self,
        )

    def restore(self, tensors: dict[str, torch.Tensor], tokens: int) -> TokenSetLayer:
        return TokenSetLayer.from_tensors(tensors, tokens, self.size_aware, merger=self)
