"""WorkingSet: the retrieved units resident for one layer, packed per KV head in position order.

Rows are kept sorted by position so that selecting every unit reproduces the full cache's key order
(and therefore the full cache's attention, bit for bit). Units already resident are reused on a new
selection; only the new ones come from the store.
"""

from __future__ import annotations

import torch

from retrieval.offload import Unit
from retrieval.subset import pad_heads

_PAD_POSITION = -1


class WorkingSet:
    """Per KV head: keys, values, positions and unit ids of the resident retrieved tokens."""

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.empty(1, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = self.k
        self.valid: torch.Tensor | None = None  # [heads, rows], None when no row is padding
        self.positions = torch.empty(heads, 0, dtype=torch.long, device=device)
        self.unit_ids = torch.empty(heads, 0, dtype=torch.long, device=device)
        self.heads = heads

    def units(self, head: int) -> set[int]:
        ids = self.unit_ids[head]
        return set(ids[ids >= 0].tolist())

    def tokens(self, head: int) -> int:
        return int((self.unit_ids[head] >= 0).sum())

    def nbytes(self) -> int:
        return 2 * self.k.nelement() * self.k.element_size()

    def rebuild(self, keep: list[set[int]], new: list[list[tuple[int, Unit]]]) -> None:
        """Keep the rows of units `keep[h]`, add the units `new[h]` ((id, unit) pairs), re-sort by position."""
        parts = [self._head(h, keep[h], new[h]) for h in range(self.heads)]
        k, self.valid = pad_heads([p[0] for p in parts])
        v, _ = pad_heads([p[1] for p in parts])
        self.positions, _ = pad_heads([p[2] for p in parts], fill=_PAD_POSITION)
        self.unit_ids, _ = pad_heads([p[3] for p in parts], fill=-1)
        self.k, self.v = k[None], v[None]

    def _head(self, h: int, keep: set[int], new: list[tuple[int, Unit]]):
        ids = self.unit_ids[h]
        rows = torch.isin(ids, torch.tensor(sorted(keep), dtype=torch.long, device=ids.device))
        k = torch.cat([self.k[0, h][rows], *(u.k.to(self.k.device) for _, u in new)])
        v = torch.cat([self.v[0, h][rows], *(u.v.to(self.v.device) for _, u in new)])
        pos = torch.cat([self.positions[h][rows], *(u.positions.to(ids.device) for _, u in new)])
        uid = torch.cat([ids[rows], *(torch.full_like(u.positions, i, device=ids.device) for i, u in new)])
        order = torch.argsort(pos, stable=True)
        return k[order], v[order], pos[order], uid[order]
