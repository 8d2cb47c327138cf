"""Per-layer K/V the engine attends over: post-RoPE `[batch, kv_heads, tokens, head_dim]` plus positions.

The store keeps one chunk as `[layers, 2, tokens, kv_heads, head_dim]`; `to_chunk`/`from_chunk` convert.
A layer may be replaced by another `LayerKV` subclass (compressed, retrieved) that keeps its own state;
the engine only calls `update`, and the layer's attention function knows how to read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class LayerKV:
    """Dense keys and values of one layer; `update` appends new rows and returns the full context.

    `k`/`v` are views of buffers with spare room, so decoding one token writes one row instead of
    copying the whole cache (torch.cat per step is O(T) per layer). Assigning `k`/`v` directly is fine:
    the next `update` sees the views no longer belong to the buffers and starts new ones.
    """

    k: torch.Tensor  # [batch, kv_heads, tokens, head_dim]
    v: torch.Tensor
    _kbuf: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _vbuf: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.k.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, end = self.length, self.length + k.shape[-2]
        if not n:
            self.k, self.v = k, v  # a prefill: keep the computed tensors, no buffer until decoding
            return k, v
        kbuf, vbuf = self._buffers_for(end)
        kbuf[..., n:end, :] = k
        vbuf[..., n:end, :] = v
        self.k, self.v = kbuf[..., :end, :], vbuf[..., :end, :]
        return self.k, self.v

    def replace(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() + self.v.nelement() * self.v.element_size()

    def _buffers_for(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers `k`/`v` live in, grown (or started) when they lack room for `end` rows."""
        kbuf, vbuf = self._kbuf, self._vbuf
        own = (
            kbuf is not None
            and vbuf is not None
            and self.k.data_ptr() == kbuf.data_ptr()
            and self.v.data_ptr() == vbuf.data_ptr()
            and self.k.shape[:-2] == kbuf.shape[:-2]
        )
        if not own or kbuf is None or vbuf is None or end > kbuf.shape[-2]:
            kbuf, vbuf = self._grow(end)
        return kbuf, vbuf

    def _grow(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A quarter more (at least 64 rows): few copies over a long decode, little idle memory.
        capacity = max(need, self.length + max(64, self.length // 4))
        shape = (*self.k.shape[:-2], capacity, self.k.shape[-1])
        kbuf, vbuf = self.k.new_empty(shape), self.v.new_empty(shape)
        kbuf[..., : self.length, :] = self.k
        vbuf[..., : self.length, :] = self.v
        self._kbuf, self._vbuf = kbuf, vbuf
        return kbuf, vbuf


class KVCache:
    """One `LayerKV` per layer and the positions of the cached tokens (shared by all layers)."""

    def __init__(self, layers: Sequence[LayerKV], positions: torch.Tensor) -> None:
        self.layers = list(layers)
        self.positions = positions.to(torch.long)

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device) -> KVCache:
        blank = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        layers = [LayerKV(blank, blank) for _ in range(num_layers)]
        return cls(layers, torch.empty(0, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.positions.numel())

    @property
    def next_position(self) -> int:
        """Where a continuation starts: one past the largest cached position (APE reuses positions)."""
        return int(self.positions.max()) + 1 if len(self) else 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def append_positions(self, positions: torch.Tensor) -> None:
        self.positions = torch.cat([self.positions, positions.to(self.positions.device, torch.long)])

    def to_chunk(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tokens [start, end) as one store chunk `[layers, 2, tokens, kv_heads, head_dim]` (batch 1)."""
        if self.layers[0].k.shape[0] != 1:
            raise ValueError(f"to_chunk needs batch 1, got batch {self.layers[0].k.shape[0]}")
        rows = [torch.stack([lay.k[0, :, start:end], lay.v[0, :, start:end]]) for lay in self.layers]
        return torch.stack(rows).transpose(2, 3).contiguous()

    @classmethod
    def from_chunk(cls, chunk: torch.Tensor, positions: torch.Tensor | None = None) -> KVCache:
        """A batch-1 cache from `[layers, 2, tokens, kv_heads, head_dim]`; positions default to 0..T-1."""
        if chunk.dim() != 5 or chunk.shape[1] != 2:
            raise ValueError(
                f"chunk must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(chunk.shape)}"
            )
        tokens = chunk.shape[2]
        if positions is None:
            positions = torch.arange(tokens, device=chunk.device)
        if positions.numel() != tokens:
            raise ValueError(f"{positions.numel()} positions for a chunk of {tokens} tokens")
        kv = chunk.transpose(2, 3).unsqueeze(2)  # [layers, 2, 1, heads, tokens, dim]
        return cls([LayerKV(layer[0], layer[1]) for layer in kv], positions)

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` cached tokens (dense layers only)."""
        for layer in self.layers:
            layer.replace(layer.k[..., :tokens, :], layer.v[..., :tokens, :])
        self.positions = self.positions[:tokens]

    def clone(self) -> KVCache:
        layers = [LayerKV(lay.k.clone(), lay.v.clone()) for lay in self.layers]
        return KVCache(layers, self.positions.clone())
