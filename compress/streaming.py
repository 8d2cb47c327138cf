"""StreamingLLM-style eviction (arXiv 2309.17453): keep the first `sinks` and the most recent tokens.

A plain token-eviction baseline: `keep` is the fraction of the prompt's tokens kept (so it can be set to
the same bytes as another method). Tokens generated later are all kept (no eviction during decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compress.base import Compressor, check_count, check_keep, register
from compress.tokenset import TokenSetLayer


def token_budget(keep: float, tokens: int, least: int) -> int:
    """Tokens a `keep` fraction leaves of `tokens` (at least `least`, at most all)."""
    return min(tokens, max(least, int(keep * tokens + 0.5)))


@register
@dataclass
class StreamingLLM(Compressor):
    """keep: fraction of prompt tokens kept, in (0, 1]. sinks: first tokens always kept (4)."""

    method: ClassVar[str] = "streaming"
    keep: float = 0.25
    sinks: int = 4

    def __post_init__(self) -> None:
        check_count("sinks", self.sinks)
        self.keep = check_keep(self.keep)

    def compress(
        self,
        module: nn.Module | None,
        hidden_states: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> TokenSetLayer:
        t = keys.shape[2]
        budget = token_budget(self.keep, t, self.sinks + 1)
        sinks = min(self.sinks, budget)
        start = t - (budget - sinks)
        return TokenSetLayer(
            k=keys[:, :, start:].contiguous(),
            v=values[:, :, start:].contiguous(),
            k_set=keys[:, :, :sinks].contiguous(),
            v_set=values[:, :, :sinks].contiguous(),
            total=t,
        )

    def restore(self, tensors: dict[str, torch.Tensor], tokens: int) -> TokenSetLayer:
        return TokenSetLayer.from_tensors(tensors, tokens, size_aware=False, merger=None)
