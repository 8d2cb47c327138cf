"""A layer that keeps, per KV head, its own set of (possibly merged) tokens, then a dense recent tail.

Chelsea (merged centroids with sizes) and the token-eviction baselines (StreamingLLM, SnapKV) all end up
here. `k_set`/`v_set` are `[batch, kv_heads, L, head_dim]`: heads may hold different numbers of tokens,
padded to L with size 0 (a padded slot gets -inf). `size` is how many original tokens each slot stands
for (None: all 1). With `size_aware`, a slot's logit gets `+ log m` (ToMe's proportional attention),
exact when the merged keys were equal. New rows go to the dense tail `k`/`v`; a `merger` (Chelsea)
compresses each full chunk that leaves the recent window, so decode keeps the saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from compress.base import CompressedLayer, attend_parts, group_queries, scores, tail_mask, tensor_bytes
from engine.attention import AttnCall


class ChunkMerger(Protocol):
    chunk: int
    recent: int

    def merge(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass
class TokenSetLayer(CompressedLayer):
    """`k`/`v`: dense tail `[batch, kv_heads, T_tail, head_dim]` (recent tokens, then new rows)."""

    method: ClassVar[str] = "tokenset"
    k_set: torch.Tensor | None = None
    v_set: torch.Tensor | None = None
    size: torch.Tensor | None = None  # [batch, kv_heads, L] float, 0 = padding; None = all ones
    total: int = 0  # original tokens covered, merged and evicted ones included
    size_aware: bool = False
    merger: ChunkMerger | None = None

    @property
    def tokens(self) -> int:
        return self.total

    @property
    def length(self) -> int:
        return self.k_set.shape[-2] + self.k.shape[-2]

    @property
    def tail_start(self) -> int:
        return self.total - self.k.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Only chunks older than every new row are merged, so rows of one forward stay causal.
        if self.merger is not None:
            self._merge_leaving()
        self.k = torch.cat([self.k, k], dim=-2)
        self.v = torch.cat([self.v, v], dim=-2)
        self.total += k.shape[-2]
        return self.k, self.v

    def _merge_leaving(self) -> None:
        c = self.merger.chunk
        while self.k.shape[-2] - self.merger.recent >= c:
            k, v, size = self.merger.merge(self.k[:, :, None, :c], self.v[:, :, None, :c])
            self.k_set = torch.cat([self.k_set, k], dim=-2)
            self.v_set = torch.cat([self.v_set, v], dim=-2)
            self.size = torch.cat([self._sizes(), size], dim=-1)
            self.k, self.v = self.k[:, :, c:].contiguous(), self.v[:, :, c:].contiguous()

    def _sizes(self) -> torch.Tensor:
        if self.size is not None:
            return self.size
        b, h, n, _ = self.k_set.shape
        return self.k_set.new_ones(b, h, n)

    def bias(self) -> torch.Tensor | None:
        """Additive per-slot logit bias `[batch, kv_heads, L]` (log m, or -inf for padding), or None."""
        if self.size is None:
            return None
        if self.size_aware:
            return self.size.log()
        zero = torch.zeros((), dtype=self.size.dtype, device=self.size.device)
        return torch.where(self.size > 0, zero, torch.full_like(zero, float("-inf")))

    def nbytes(self) -> int:
        return tensor_bytes(self.k_set, self.v_set, self.size, self.k, self.v)

    def dense_nbytes(self) -> int:
        b, h, _, d = self.k.shape
        return 2 * b * h * self.total * d * self.k.element_size()

    def attend(self, call: AttnCall) -> torch.Tensor:
        q = group_queries(call.q, self.k.shape[1])
        kept = scores(q, self.k_set, call.scale)
        bias = self.bias()
        kept = kept if bias is None else kept + bias[:, :, None, None, :]
        tail = scores(q, self.k, call.scale)
        mask = tail_mask(call.q_index, self.tail_start, self.k.shape[-2])
        tail = tail if mask is None else tail + mask
        return attend_parts([kept, tail], [self.v_set, self.v], call.q.dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        named = {"k_set": self.k_set, "v_set": self.v_set, "k": self.k, "v": self.v}
        if self.size is not None:
            named["size"] = self.size
        return {name: t[0].contiguous() for name, t in named.items()}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], total: int, size_aware: bool, merger: ChunkMerger | None
    ) -> TokenSetLayer:
        t = {name: x.unsqueeze(0) for name, x in tensors.items()}
        return cls(
            k=t["k"],
            v=t["v"],
            k_set=t["k_set"],
            v_set=t["v_set"],
            size=t.get("size"),
            total=total,
            size_aware=size_aware,
            merger=merger,
        )


def select_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head token selection: x `[b, h, T, d]`, index `[b, h, n]` -> `[b, h, n, d]`."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1])).contiguous()
