"""SnapKV (arXiv 2404.14469): keep the prompt tokens the observation window attends to most.

The last `window` prompt queries attend over the prompt; each older token's score is its attention
summed over the window rows and averaged over the KV head's query group, then max-pooled over
`kernel` neighbouring tokens (keeps phrases whole). Per KV head, the best tokens up to the budget are
kept with the window itself. `keep` is the fraction of prompt tokens kept (to match another method's
bytes). A token-eviction baseline: nothing is merged and decode keeps every new token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress.base import Compressor, check_count, check_keep, group_queries, register
from compress.streaming import token_budget
from compress.tokenset import TokenSetLayer, select_tokens


def window_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`[batch, kv_heads, T]`: the causal attention of the prompt's last rows (`queries`, post-RoPE
    `[batch, heads, window, head_dim]`) on every token, summed over the rows, averaged over the group."""
    b, h, t, d = keys.shape
    w = queries.shape[2]
    q = group_queries(queries, h).float()
    logits = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * d**-0.5
    future = (
        torch.arange(t, device=keys.device)[None, :] > (torch.arange(w, device=keys.device) + t - w)[:, None]
    )
    logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=3).mean(dim=2)


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool scores `[batch, kv_heads, n]` over `kernel` neighbours (keeps phrases whole)."""
    return F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, kernel: int) -> torch.Tensor:
    """`[batch, kv_heads, T - window]` pooled attention of the window rows on the older tokens."""
    w = queries.shape[2]
    return pool(window_attention(queries, keys)[..., : keys.shape[2] - w], kernel)


@register
@dataclass
class SnapKV(Compressor):
    """keep: fraction of prompt tokens kept, in (0, 1]. window: observation rows (32). kernel: pooling (7)."""

    method: ClassVar[str] = "snapkv"
    keep: float = 0.25
    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        check_count("window", self.window, low=1)
        if check_count("kernel", self.kernel, low=1) % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pool), got {self.kernel}")
        self.keep = check_keep(self.keep)

    def observation_rows(self) -> int:
        return self.window

    def compress(
        self,
        module: nn.Module | None,
        hidden_states: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> TokenSetLayer:
        queries = kwargs.get("queries")
        if queries is None:
            raise ValueError("SnapKV needs the observation window's queries in kwargs['queries']")
        b, h, t, d = keys.shape
        w = min(queries.shape[2], t)
        budget = token_budget(self.keep, t, 1)
        pick = max(min(budget - w, t - w), 0)
        start = t - min(budget, w)  # a budget below the window keeps only the newest tokens
        if pick:
            index = window_scores(queries[:, :, -w:], keys, self.kernel).topk(pick, dim=-1).indices
            index = index.sort(dim=-1).values
        else:
            index = torch.empty(b, h, 0, dtype=torch.long, device=keys.device)
        return TokenSetLayer(
            k=keys[:, :, start:].contiguous(),
            v=values[:, :, start:].contiguous(),
            k_set=select_tokens(keys, index),
            v_set=select_tokens(values, index),
            total=t,
        )

    def restore(self, tensors: dict[str, torch.Tensor], tokens: int) -> TokenSetLayer:
        return TokenSetLayer.from_tensors(tensors, tokens, size_aware=False, merger=None)
