"""Chelsea / CentroidKV: chunked soft matching of keys, merged into size-weighted centroids (arXiv 2506.11418).

Per layer and KV head: the first `sinks` and last `recent` tokens stay as they are; the rest is cut into
chunks of `chunk` tokens. Inside a chunk, even offsets form set A and odd offsets set B; each a picks its
most cosine-similar b (keys only), and the `r` best edges are merged (several a may join one b): the
centroid is the size-weighted mean of the keys and of the values, with its size m kept, at b's slot.
Passes repeat on the survivors (re-partitioned A/B by slot) until a head holds `keep * chunk` tokens
per chunk on average. The spec leaves r open. A pass merges at most `per_pass` (default 1/4) of the
candidate edges, the most similar first, chosen over all chunks of the head: with r = |A| per chunk
(the first version) keep <= 0.5 merged every a whatever its similarity, so nothing was ever chosen;
now chunks of near-duplicates shrink more and distinct tokens (a number, a name) survive longer
(1K teacher forcing at keep 0.25: top-1 0.625 -> 0.672, KL 1.38 -> 1.07). A leftover shorter than a
chunk joins the recent tail and is merged once decode fills it (see TokenSetLayer).

`protect` (off by default) reserves a fraction of each head's budget for the tokens the prompt's last
`window` queries attend to most (SnapKV's observation score: their attention summed over the rows,
averaged over the KV head's query group, max-pooled over `kernel` tokens): those tokens stay unmerged
(size 1) and take no part in the matching, the rest is merged by the cosine passes into the remaining
slots, so the layer holds exactly the bytes of plain Chelsea at the same keep. Key cosine alone marks a
passkey's digits as the most redundant tokens of a chunk and merges them away (README, Compression);
the window's attention finds them when the question is among the last queries. Chunks merged during
decode have no observation window and are merged plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress.base import Compressor, check_count, check_fraction, check_keep, register
from compress.snapkv import pool, window_attention
from compress.tokenset import TokenSetLayer


@dataclass
class Merge:
    """Centroids of a head's chunks `[N, n, c, ...]`: size-weighted sums of keys and values and the sizes
    m (0 = merged away). Slots never move: a centroid stays at its b's slot, so survivors keep their order.
    `frozen` slots (protected tokens, or None) are never merged and never merged into."""

    k_sum: torch.Tensor
    v_sum: torch.Tensor
    m: torch.Tensor
    frozen: torch.Tensor | None = None

    @property
    def alive(self) -> torch.Tensor:
        return self.m > 0

    def centroids(self) -> torch.Tensor:
        return self.k_sum / self.m.clamp(min=1e-30)[..., None]


def best_edges(state: Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """Each a's cosine similarity to its most similar b of the same chunk, and that b's offset, `[N, n, c]`.

    A and B alternate over a chunk's surviving unfrozen tokens in slot order; entries not in A get -inf."""
    free = state.alive if state.frozen is None else state.alive & ~state.frozen
    rank = free.long().cumsum(-1) - 1
    a_set, b_set = free & (rank % 2 == 0), free & (rank % 2 == 1)
    unit = F.normalize(state.centroids().float(), dim=-1)
    sim = (unit @ unit.transpose(-1, -2)).masked_fill(~b_set[..., None, :], float("-inf"))
    best, into = sim.max(dim=-1)
    return best.masked_fill(~a_set, float("-inf")), into


def merge_pass(state: Merge, best: torch.Tensor, into: torch.Tensor, r: torch.Tensor) -> Merge:
    """Merge each row's `r[row]` most similar a->b edges (from `best_edges`), chosen over all its chunks."""
    n_rows, n, c = state.m.shape
    pick = best.view(n_rows, -1).topk(int(r.max()), dim=-1).indices  # flat (chunk, offset) of each a
    take = torch.arange(pick.shape[1], device=pick.device)[None, :] < r[:, None]
    row = torch.arange(n_rows, device=pick.device)[:, None].expand_as(pick)[take]
    b_off = into.view(n_rows, -1).gather(1, pick)[take]
    pick = pick[take]
    a_at, b_at = (row, pick // c, pick % c), (row, pick // c, b_off)
    k_sum, v_sum, m = state.k_sum.clone(), state.v_sum.clone(), state.m.clone()
    for x in (k_sum, v_sum, m):
        x.index_put_(b_at, x[a_at], accumulate=True)  # several a may join one b
        x[a_at] = 0
    return Merge(k_sum, v_sum, m, state.frozen)


def merge_chunks(
    k: torch.Tensor, v: torch.Tensor, target: int, per_pass: float, frozen: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Merge each row of chunks `[N, n, c, d]` down to `n * target` tokens by soft-matching passes.

    Each pass merges at most `per_pass` of the row's candidate edges (one per a), the most similar
    first, and the row's chunks compete for them: a chunk of near-duplicates shrinks more than one of
    distinct tokens. `frozen` (`[N, n, c]` bool, or None) marks tokens kept as they are: they count
    toward the row's `n * target` but take no part in the matching. Rows are independent. Returns keys,
    values `[N, n * target, d]` and sizes `[N, n * target]` in slot order."""
    n_rows, n, c, d = k.shape
    m = torch.ones(n_rows, n, c, dtype=k.dtype, device=k.device)
    state, total = Merge(k * 1, v * 1, m, frozen), n * target
    while bool((excess := state.alive.view(n_rows, -1).sum(-1) - total).gt(0).any()):
        best, into = best_edges(state)
        edges = torch.isfinite(best).view(n_rows, -1).sum(-1)
        if bool(((excess > 0) & (edges == 0)).any()):
            raise ValueError(f"cannot merge {n}x{c} tokens down to {total}: no chunk has two tokens left")
        r = torch.minimum(excess, torch.ceil(per_pass * edges.double()).long().clamp(min=1)).clamp(min=0)
        state = merge_pass(state, best, into, r)
    order = _survivors(state.alive.view(n_rows, -1), total)
    sizes = state.m.view(n_rows, -1).gather(1, order)
    pick = order[..., None].expand(-1, -1, d)
    keys = state.k_sum.view(n_rows, -1, d).gather(1, pick) / sizes[..., None]
    values = state.v_sum.view(n_rows, -1, d).gather(1, pick) / sizes[..., None]
    return keys, values, sizes


def _survivors(alive: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices of each row's `total` surviving slots, in slot order."""
    slot = torch.arange(alive.shape[1], device=alive.device).expand_as(alive)
    return torch.where(alive, slot, slot + alive.shape[1]).sort(dim=-1).values[:, :total]


@register
@dataclass
class Chelsea(Compressor):
    """keep: fraction of each chunk's tokens kept (0.25 = 75% fewer in the merged region; 1 = none merged).
    chunk: tokens per chunk (32). sinks / recent: first and last tokens kept as they are (4 / 32).
    size_aware: add `log m` to a centroid's logit (ToMe's proportional attention).
    per_pass: at most this fraction of the candidate edges merges per pass (best first, over the head's
    chunks), so passes repeat until the keep ratio; 1 merges as much as one pass can.
    protect: fraction of each head's merged-region budget kept for the tokens the last `window` prompt
    queries attend to most (max-pooled over `kernel`), unmerged; 0 (default) is Chelsea as specified.
    At most all but one slot per chunk is protected, so the passes can always reach the keep ratio."""

    method: ClassVar[str] = "chelsea"
    keep: float = 0.25
    chunk: int = 32
    sinks: int = 4
    recent: int = 32
    size_aware: bool = True
    per_pass: float = 0.25
    protect: float = 0.0
    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        self.protect = check_fraction("protect", self.protect, 0.0, 1.0, high_open=False)
        check_count("window", self.window, low=1)
        if check_count("kernel", self.kernel, low=1) % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pool), got {self.kernel}")
        check_count("chunk", self.chunk, low=2)
        self.per_pass = check_fraction("per_pass", self.per_pass, 0.0, 1.0, high_open=False)
        if self.per_pass == 0:
            raise ValueError("per_pass must lie in (0, 1], got 0: no pass would merge anything")
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
        """Tokens each chunk keeps on average (a head keeps `target` per chunk in total)."""
        return int(self.keep * self.chunk + 0.5)

    def observation_rows(self) -> int:
        return self.window if self.protect > 0 else 0

    def params(self) -> dict[str, Any]:
        """Without protection the recorded parameters are those of the specified method (as before)."""
        params = super().params()
        if self.protect == 0:
            for name in ("protect", "window", "kernel"):
                params.pop(name)
        return params

    def protected(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Tokens kept unmerged, `[b, h, n, chunk]` bool, from observation scores of the same shape:
        each head's `protect * n * target` best (at most n * (target - 1)); None if none."""
        b, h, n, c = scores.shape
        count = min(int(self.protect * n * self.target + 0.5), n * (self.target - 1))
        if count <= 0:
            return None
        flat = scores.reshape(b, h, n * c)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(-1, flat.topk(count, dim=-1).indices, True)
        return mask.view(b, h, n, c)

    def merge(
        self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunks `[b, h, n, chunk, d]` -> merged `[b, h, n*target, d]` keys and values, and sizes.
        `scores` `[b, h, n, chunk]`: observation scores choosing the protected tokens (None: none)."""
        b, h, n, c, d = k.shape
        frozen = None if scores is None else self.protected(scores)
        keys, values, sizes = merge_chunks(
            k.reshape(b * h, n, c, d),
            v.reshape(b * h, n, c, d),
            self.target,
            self.per_pass,
            None if frozen is None else frozen.reshape(b * h, n, c),
        )
        return keys.view(b, h, -1, d), values.view(b, h, -1, d), sizes.view(b, h, -1)

    def scores(self, queries: torch.Tensor | None, keys: torch.Tensor, mid: tuple[int, int]) -> torch.Tensor:
        """Observation scores of the tokens `keys[:, :, mid[0]:mid[1]]`, `[b, h, mid[1] - mid[0]]`."""
        if queries is None:
            raise ValueError(
                "Chelsea with protect > 0 needs the observation window's queries in kwargs['queries']"
            )
        w = min(self.window, queries.shape[2], keys.shape[2])
        return pool(window_attention(queries[:, :, -w:], keys)[..., mid[0] : mid[1]], self.kernel)

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
        score = None
        if self.protect > 0 and chunks:
            score = self.scores(kwargs.get("queries"), keys, mid).view(b, h, chunks, self.chunk)
        k_m, v_m, size = self.merge(k_mid, v_mid, score)
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
