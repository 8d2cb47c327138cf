"""ThinK: query-driven key-channel pruning (ICLR'25, arXiv 2407.21018), with a really smaller key tensor.

Per KV head h and channel c the score is `||Q_w[:, c]|| * ||K[:, c]||`, Q_w = the last `window` prompt
queries (post-RoPE) of the head's query group. The `int(D * lam)` lowest channels are pruned from every
prompt key older than the window: those keys are stored as a `[T_old, D_kept]` tensor plus the kept
channel index (one byte per kept channel: the paper stores a channel mask, and an int64 index cost 8x
that for no information). The window's keys, every later key and all values stay full width. Attention scales by
the original `1/sqrt(D)`: `softmax(concat(q[kept] . K_pruned, q . K_full) / sqrt(D)) . V`.
kvpress's ThinKPress zeroes the channels instead (same scores, no bytes saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from compress.base import (
    CompressedLayer,
    Compressor,
    attend_parts,
    check_count,
    check_fraction,
    group_queries,
    register,
    scores,
    tail_mask,
    tensor_bytes,
)
from engine.attention import AttnCall


def channel_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`[batch, kv_heads, head_dim]`: query-channel norm (pooled over the group) x key-channel norm."""
    q = group_queries(queries, keys.shape[1]).float()
    q_norm = q.pow(2).sum(dim=(2, 3)).sqrt()
    k_norm = keys.float().pow(2).sum(dim=2).sqrt()
    return q_norm * k_norm


def index_dtype(head_dim: int) -> torch.dtype:
    """The smallest integer dtype that holds a channel number of `head_dim` channels."""
    return torch.uint8 if head_dim <= 256 else torch.int16


def pruned_channels(head_dim: int, lam: float) -> int:
    """How many channels lambda prunes (`int(D * lam)`, as the spec, ThinK's code and kvpress round: 25 of
    64 at 0.4, so the saving stays below lam/2); ValueError if it would prune all of them."""
    pruned = int(head_dim * lam)
    if pruned >= head_dim:
        raise ValueError(f"lam={lam} prunes all {head_dim} key channels; it must leave at least one")
    return pruned


@dataclass
class ThinKLayer(CompressedLayer):
    """`k`: full-width keys of the window and later tokens; `v`: every value, in token order;
    `k_pruned`: `[batch, kv_heads, T_old, D_kept]` older prompt keys; `channels`: `[batch, kv_heads, D_kept]`
    kept channel numbers (uint8 up to 256 channels; widened to int64 only where torch's gather needs it).
    """

    method: ClassVar[str] = "think"
    k_pruned: torch.Tensor | None = None
    channels: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.v.shape[-2]

    @property
    def length(self) -> int:
        return self.tokens

    @property
    def old(self) -> int:
        return self.k_pruned.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = torch.cat([self.k, k], dim=-2)
        self.v = torch.cat([self.v, v], dim=-2)
        return self.k, self.v

    def nbytes(self) -> int:
        return tensor_bytes(self.k_pruned, self.channels, self.k, self.v)

    def dense_nbytes(self) -> int:
        return 2 * tensor_bytes(self.v)

    def attend(self, call: AttnCall) -> torch.Tensor:
        q = group_queries(call.q, self.k.shape[1])
        b, h, g, r, d = q.shape
        index = self.channels.long()[:, :, None, None, :].expand(b, h, g, r, self.channels.shape[-1])
        old = scores(q.gather(-1, index), self.k_pruned, call.scale)
        new = scores(q, self.k, call.scale)
        mask = tail_mask(call.q_index, self.old, self.k.shape[-2])
        new = new if mask is None else new + mask
        values = [self.v[:, :, : self.old], self.v[:, :, self.old :]]
        return attend_parts([old, new], values, call.q.dtype)

    def zero_filled(self) -> torch.Tensor:
        """The keys as kvpress would hold them: full width, pruned channels zero (a reference)."""
        b, h, t, _ = self.k_pruned.shape
        full = self.k.new_zeros(b, h, t, self.k.shape[-1])
        full.scatter_(-1, self.channels.long()[:, :, None, :].expand(b, h, t, -1), self.k_pruned)
        return torch.cat([full, self.k], dim=-2)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        named = {"k_pruned": self.k_pruned, "channels": self.channels, "k": self.k, "v": self.v}
        return {name: t[0].contiguous() for name, t in named.items()}


@register
@dataclass
class ThinK(Compressor):
    """lam: fraction of key channels pruned per KV head (default 0.4: 39 of 64 kept).
    window: prompt queries that score the channels and keys kept full width (default 32)."""

    method: ClassVar[str] = "think"
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
    ) -> ThinKLayer:
        queries = kwargs.get("queries")
        if queries is None:
            raise ValueError("ThinK needs the observation window's queries in kwargs['queries']")
        b, h, t, d = keys.shape
        keep = d - pruned_channels(d, self.lam)
        channels = channel_scores(queries, keys).topk(keep, dim=-1).indices.sort(dim=-1).values
        old = max(t - self.window, 0)
        k_pruned = keys[:, :, :old].gather(-1, channels[:, :, None, :].expand(b, h, old, keep))
        channels = channels.to(index_dtype(d))
        return ThinKLayer(
            k=keys[:, :, old:].contiguous(),
            v=values.contiguous(),
            k_pruned=k_pruned.contiguous(),
            channels=channels.contiguous(),
        )

    def restore(self, tensors: dict[str, torch.Tensor], tokens: int) -> ThinKLayer:
        t = {name: x.unsqueeze(0) for name, x in tensors.items()}
        return ThinKLayer(k=t["k"], v=t["v"], k_pruned=t["k_pruned"], channels=t["channels"])
