"""UnitPool: one layer's offloaded units per KV head (store key, size, mean key) and how they are chosen.

Selection is group-consistent (LouisKV): per KV head, a unit's score is the mean over the head's query
group of softmax over units of `q . c_u / sqrt(d)`; units are taken best first while they fit the budget.
With `follow` > 0, each unit taken brings right after it the units holding the `follow` tokens that come
after each of its members (see `LouisKVConfig.follow`).
"""

from __future__ import annotations

import torch

PoolSnapshot = tuple[
    list[list[str]], list[list[int]], list[list[torch.Tensor]], list[list[list[int]]], list[dict[int, int]]
]


class UnitPool:
    """Units of one layer, per KV head; grows as prompt clusters and output segments are offloaded."""

    def __init__(self, heads: int, head_dim: int, device: torch.device) -> None:
        self.keys: list[list[str]] = [[] for _ in range(heads)]
        self._sizes: list[list[int]] = [[] for _ in range(heads)]
        self._means: list[list[torch.Tensor]] = [[] for _ in range(heads)]
        self._positions: list[list[list[int]]] = [[] for _ in range(heads)]  # members' positions
        self._at: list[dict[int, int]] = [{} for _ in range(heads)]  # position -> unit holding it
        self.head_dim = head_dim
        self.device = device
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, head: int, key: str, keys: torch.Tensor, positions: torch.Tensor) -> int:
        """Register a unit whose keys are `keys` `[tokens, d]` at `positions` `[tokens]`; returns its id
        within the head."""
        uid = len(self.keys[head])
        self.keys[head].append(key)
        self._sizes[head].append(int(keys.shape[0]))
        self._means[head].append(keys.float().mean(0))
        members = [int(p) for p in positions.tolist()]
        self._positions[head].append(members)
        self._at[head].update(dict.fromkeys(members, uid))
        self._stacked = None
        return uid

    def snapshot(self) -> PoolSnapshot:
        """The units registered so far (keys, sizes, mean keys, positions per head), for another pool to
        start from."""
        return (
            [list(k) for k in self.keys],
            [list(s) for s in self._sizes],
            [list(m) for m in self._means],
            [list(p) for p in self._positions],
            [dict(a) for a in self._at],
        )

    def restore(self, snap: PoolSnapshot) -> None:
        """Start from another pool's `snapshot` (its units stay in the store under their keys)."""
        keys, sizes, means, positions, at = snap
        self.keys, self._sizes, self._means = (
            [list(k) for k in keys],
            [list(s) for s in sizes],
            [list(m) for m in means],
        )
        self._positions, self._at = [list(p) for p in positions], [dict(a) for a in at]
        self._stacked = None

    def size(self, head: int, unit: int) -> int:
        return self._sizes[head][unit]

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys)

    def nbytes(self) -> int:
        """Metadata resident for scoring (mean keys and sizes): small next to the KV it indexes."""
        return len(self) * (self.head_dim * 4 + 8)

    def select(self, q: torch.Tensor, scale: float, budget: int, follow: int = 0) -> list[list[int]]:
        """Unit ids per KV head for the query `q` `[heads, d]` (one row per query head), best first,
        taking units in score order while their tokens fit `budget`; with `follow`, each unit taken is
        followed by the units holding the `follow` tokens after each of its members."""
        means, sizes, valid = self._stack()
        if means.shape[1] == 0:
            return [[] for _ in self.keys]
        scores = self.scores(q, means, valid, scale)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        if follow > 0:
            return [self._with_followers(h, order[h], budget, follow) for h in range(order.shape[0])]
        fits = (torch.gather(sizes, 1, order).cumsum(-1) <= budget) & torch.gather(valid, 1, order)
        return [order[h][fits[h]].tolist() for h in range(order.shape[0])]

    def _with_followers(self, head: int, order: torch.Tensor, budget: int, follow: int) -> list[int]:
        at, sizes, n = self._at[head], self._sizes[head], len(self.keys[head])
        chosen: list[int] = []
        taken: set[int] = set()
        used = 0
        for u in order.tolist():
            if u >= n:  # padding of a head with fewer units
                break
            after = (at.get(p + d) for d in range(1, follow + 1) for p in self._positions[head][u])
            for w in [u, *after]:
                if w is None or w in taken:
                    continue
                if used + sizes[w] > budget:
                    return chosen
                chosen.append(w)
                taken.add(w)
                used += sizes[w]
        return chosen

    @staticmethod
    def scores(q: torch.Tensor, means: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        heads, units, d = means.shape
        qg = q.float().view(heads, -1, d)  # [kv_heads, group, d]
        logits = torch.einsum("hgd,hud->hgu", qg, means) * scale
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        return logits.softmax(-1).mean(1)

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._stacked is None:
            longest = max(len(k) for k in self.keys)
            heads = len(self.keys)
            means = torch.zeros(heads, longest, self.head_dim, device=self.device)
            sizes = torch.zeros(heads, longest, dtype=torch.long, device=self.device)
            valid = torch.zeros(heads, longest, dtype=torch.bool, device=self.device)
            for h in range(heads):
                n = len(self.keys[h])
                if n:
                    means[h, :n] = torch.stack(self._means[h])
                    sizes[h, :n] = torch.tensor(self._sizes[h], device=self.device)
                    valid[h, :n] = True
            self._stacked = (means, sizes, valid)
        return self._stacked
