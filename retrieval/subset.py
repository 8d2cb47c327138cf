"""Exact attention over a different subset of cached tokens per KV head.

Keys are cached post-RoPE, so attending over any subset at the tokens' original positions needs no
re-rotation: gather the rows, pad heads to one length, and mask the padding. With no padding the call
is the same SDPA call as the engine's full-cache decode, so selecting everything is bit-exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def subset_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q `[1, heads, rows, d]` over k, v `[1, kv_heads, keys, d]`; `valid` `[kv_heads, keys]` marks real
    (non-padding) keys, None if all are real. Every row sees every valid key (the caller keeps it causal)."""
    mask = None
    if valid is not None:
        group = q.shape[1] // k.shape[1]
        mask = valid.repeat_interleave(group, dim=0)[None, :, None, :]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def pad_heads(rows: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-head tensors `[n_h, ...]` into `[heads, max n_h, ...]` and the validity mask
    `[heads, max n_h]` (None when every head has the same length: no padding, no mask)."""
    lengths = [r.shape[0] for r in rows]
    longest = max(lengths, default=0)
    if all(n == longest for n in lengths):
        return torch.stack(rows), None
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), fill)
    valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for h, r in enumerate(rows):
        out[h, : r.shape[0]] = r
        valid[h, : r.shape[0]] = True
    return out, valid
