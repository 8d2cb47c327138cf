"""Attention functions the engine calls per layer; swapping one is how blend/compress/retrieval hook in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kvcache import LayerKV


@dataclass
class AttnCall:
    """Everything an attention function may need at one layer."""

    layer: int
    q: torch.Tensor  # [batch, heads, q_rows, head_dim], post-RoPE
    k: torch.Tensor  # [batch, kv_heads, k_rows, head_dim]: the whole context this layer attends over
    v: torch.Tensor
    q_index: torch.Tensor  # [q_rows]: each query row's index in the context; row i sees keys 0..q_index[i]
    q_positions: torch.Tensor  # [q_rows]: RoPE positions of the query rows
    scale: float
    kv: LayerKV | None = None  # the layer's cache object, for functions that read extra state from it


AttentionFn = Callable[[AttnCall], torch.Tensor]


def causal_mask(q_index: torch.Tensor, k_rows: int) -> torch.Tensor | None:
    """Boolean [q_rows, k_rows] mask allowing key j for query i iff j <= q_index[i]; None if all allowed."""
    if int(q_index.min()) >= k_rows - 1:
        return None
    return torch.arange(k_rows, device=q_index.device)[None, :] <= q_index[:, None]


def causal_attention(call: AttnCall) -> torch.Tensor:
    """Exact softmax attention with the index-causal mask (GQA handled by SDPA)."""
    rows, k_rows = call.q.shape[-2], call.k.shape[-2]
    if rows == k_rows and bool((call.q_index == torch.arange(rows, device=call.q_index.device)).all()):
        mask, causal = None, True  # plain prefill: let SDPA use its fused causal path
    else:
        mask, causal = causal_mask(call.q_index, k_rows), False
    return F.scaled_dot_product_attention(
        call.q,
        call.k,
        call.v,
        attn_mask=mask,
        is_causal=causal,
        scale=call.scale,
        enable_gqa=call.q.shape[1] != call.k.shape[1],
    )
