"""APE, adaptive parallel encoding (ICML'25): cached contexts side by side, merged by attention.

Each context is encoded alone right after the shared prefix, so every context starts at position
|prefix| and its KV depends only on (prefix, context): exactly the stored segment. The question and the
generated tokens start at |prefix| + max |context|. At every layer their attention is split in two
parts: over the contexts with temperature T (`LSE_C`, `o_C`), and over prefix + question, causal
(`LSE_O`, `o_O`); the parts are merged with weights `softmax([S * T * LSE_C, LSE_O])`. T = S = 1 is plain
parallel encoding (one softmax over everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.attention import AttnCall

MERGES = ("scaled", "shifted")


@dataclass
class APEConfig:
    """temperature T and scale S (APE's README: 0.9 / 0.9; T = S = 1 is plain parallel encoding).

    merge: how S enters the contexts' log-weight. "scaled": `S * T * LSE_C` (the spec; APE's
    ape_llama.py); "shifted": `T * LSE_C + log S` (the contexts' mass times S: a reworked
    src/ape_llama.py in a fork of APE's code). Both are plain parallel encoding at T = S = 1.
    """

    temperature: float = 0.9
    scale: float = 0.9
    merge: str = "scaled"

    def __post_init__(self) -> None:
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value <= 10.0:
                raise ValueError(f"APEConfig.{name} must be a number in (0, 10], got {value!r}")
        if self.merge not in MERGES:
            raise ValueError(f"APEConfig.merge must be one of {MERGES}, got {self.merge!r}")

    def context_weight(self, lse_c: torch.Tensor) -> torch.Tensor:
        """The contexts' log-weight in the merge, from their tempered log-sum-exp `LSE_C`."""
        t, s = self.temperature, self.scale
        return s * t * lse_c if self.merge == "scaled" else t * lse_c + math.log(s)


@dataclass
class APEAttention:
    """The attention function for rows after the contexts, which occupy context rows [start, end)."""

    start: int
    end: int
    config: APEConfig

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"context rows must satisfy 0 <= start <= end, got [{self.start}, {self.end})")

    def __call__(self, call: AttnCall) -> torch.Tensor:
        if int(call.q_index.min()) < self.end:
            raise ValueError(
                f"APE attention is for rows after the contexts (index >= {self.end}), got {int(call.q_index.min())}"
            )
        group = call.q.shape[1] // call.k.shape[1]
        k = call.k.repeat_interleave(group, dim=1) if group > 1 else call.k
        v = call.v.repeat_interleave(group, dim=1) if group > 1 else call.v
        scores = (call.q @ k.transpose(-1, -2)).float() * call.scale  # [b, heads, rows, keys]
        keys = torch.arange(k.shape[-2], device=scores.device)
        in_ctx = (keys >= self.start) & (keys < self.end)
        visible = keys[None, :] <= call.q_index[:, None]  # the exact causal mask for the other part
        ctx = scores.masked_fill(~in_ctx, float("-inf")) / self.config.temperature
        other = scores.masked_fill(in_ctx | ~visible, float("-inf"))
        lse_c = torch.logsumexp(ctx, dim=-1, keepdim=True)
        lse_o = torch.logsumexp(other, dim=-1, keepdim=True)
        o_c = _weighted(ctx, lse_c, v)
        o_o = _weighted(other, lse_o, v)
        weights = torch.softmax(torch.cat([self.config.context_weight(lse_c), lse_o], dim=-1), dim=-1)
        out = weights[..., :1] * o_c + weights[..., 1:] * o_o
        return out.to(call.q.dtype)


def _weighted(scores: torch.Tensor, lse: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v, with an all-masked part (no contexts) giving zeros instead of NaN."""
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0))
    return probs @ v.float()
