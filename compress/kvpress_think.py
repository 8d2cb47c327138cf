"""kvpress's ThinKPress as a baseline: the same channel ranking, but pruned channels are zeroed in place.

The keys keep their full `[T, D]` shape, so it saves no bytes; it shows what the ranking alone costs in
quality. When kvpress is installed (`pip install --no-deps kvpress` plus cachetools, fire, datasets: its
pins ask for transformers < 5.3, which this project does not use) its own `ThinKPress.compress` runs;
otherwise a transcription of that method (kvpress 0.5.5, `presses/think_press.py`). Unlike our ThinK it
zeroes every prompt key, the observation window's included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compress.base import Compressor, check_count, check_fraction, group_queries, register
from engine.kvcache import LayerKV


def kvpress_version() -> str | None:
    """The installed kvpress version, or None (the transcription is used)."""
    try:
        import kvpress  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import version

    return version("kvpress")


def zero_channels(queries: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """ThinKPress.compress transcribed: mean squared channel norms, lowest `int(D * lam)` set to 0."""
    b, h, t, d = keys.shape
    q_norm = group_queries(queries, h).pow(2).mean(dim=3).mean(dim=2)
    scores = q_norm * keys.pow(2).mean(dim=2)
    index = scores.topk(int(d * lam), dim=-1, largest=False).indices
    return keys.scatter(-1, index.unsqueeze(2).expand(-1, -1, t, -1), 0)


@register
@dataclass
class KVPressThinK(Compressor):
    """lam: fraction of key channels zeroed. window: observation rows (32)."""

    method: ClassVar[str] = "kvpress_think"
    lam: float = 0.4
    window: int = 32

    def __post_init__(self) -> None:
        self.lam = check_fraction("lam", self.lam, 0.0, 1.0, high_open=True)
        check_count("window", self.window, low=1)

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
    ) -> LayerKV:
        if self.lam == 0:
            return LayerKV(keys, values)
        if kvpress_version() is not None and module is not None and hidden_states is not None:
            from kvpress import ThinKPress

            press = ThinKPress(key_channel_compression_ratio=self.lam, window_size=self.window)
            extra = {"hidden_states": hidden_states, "position_embeddings": kwargs["position_embeddings"]}
            keys, values = press.compress(module, hidden_states, keys.clone(), values, attentions, extra)
            return LayerKV(keys, values)
        queries = kwargs.get("queries")
        if queries is None:
            raise ValueError("the kvpress ThinK baseline needs kwargs['queries'] when kvpress is absent")
        return LayerKV(zero_channels(queries, keys, self.lam), values)
