"""UnitStore: a retriever's offloaded KV units, kept as entries of a `TieredStore`, with the traffic counted.

A unit is the KV of a set of tokens for one layer (and, for LouisKV, one KV head): tensors "k" and "v"
`[..., tokens, head_dim]` plus the tokens' original positions. Units are written once and read back on
demand, so the full cache lives in the store (host RAM, spilling to disk or Redis as the store's tiers
say) and only what a step needs is resident. Keys are a random session id plus the unit's coordinates:
two sessions on one store never collide, and `release` forgets exactly this session's entries.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from kvstore.config import StoreConfig
from kvstore.format import Entry
from kvstore.layout import KVLayout
from kvstore.store import TieredStore


@dataclass
class Unit:
    """What a retriever fetches: keys, values and original positions of one unit."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # [tokens] int64

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k) + _nbytes(self.v) + _nbytes(self.positions)


@dataclass
class Traffic:
    """Bytes and units moved between the working set and the store."""

    bytes_offloaded: int = 0
    units_offloaded: int = 0
    bytes_fetched: int = 0
    units_fetched: int = 0
    tokens_fetched: int = 0


class UnitStore:
    """Puts and gets units under this session's keys in `store`; counts every byte that moves."""

    def __init__(self, store: TieredStore, layout: KVLayout) -> None:
        if not isinstance(store, TieredStore):
            raise TypeError(f"store must be a kvstore TieredStore, got {type(store).__name__}")
        self.store = store
        self.layout = layout
        self.session = uuid.uuid4().hex
        self.traffic = Traffic()
        self._keys: set[str] = set()

    def key(self, *coords: int) -> str:
        return self.session + "-" + "-".join(str(int(c)) for c in coords)

    def put(self, key: str, unit: Unit, **meta: int) -> None:
        """Store a private copy of `unit` (slices of a live cache must not keep the whole cache alive)."""
        tensors = {"k": unit.k.detach().clone(), "v": unit.v.detach().clone()}
        positions = unit.positions.detach().to(torch.int64).clone()
        entry = Entry(key, self.layout, tensors, positions, dict(meta, num_tokens=int(positions.numel())))
        self.store.put(entry, copy=False)
        self._keys.add(key)
        self.traffic.bytes_offloaded += entry.nbytes
        self.traffic.units_offloaded += 1

    def get(self, key: str) -> Unit:
        """The unit (a copy the caller owns); LookupError if the store lost it (its tiers are too small)."""
        entry = self.store.get(key)
        if entry is None:
            raise LookupError(
                f"KV unit {key} is no longer in the store: its tiers are too small for this session "
                f"(stats: {self.store.stats()['tiers']})"
            )
        self.traffic.bytes_fetched += entry.nbytes
        self.traffic.units_fetched += 1
        self.traffic.tokens_fetched += entry.num_tokens
        return Unit(entry.tensors["k"], entry.tensors["v"], entry.positions)

    def release(self) -> int:
        """Forget this session's units in the store; returns how many were held."""
        removed = sum(self.store.remove(key) for key in self._keys)
        self._keys.clear()
        return removed

    def stored_keys(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def default_store() -> TieredStore:
    """A host-RAM store for a retriever that was given none (pass a disk-backed one to spill)."""
    return TieredStore(StoreConfig(host_bytes=4 << 30, write_behind=False))


def _nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()
