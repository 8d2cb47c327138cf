"""KVConnector: the in-process engine API over a TieredStore, in tokens instead of keys.

Prefix calls (`lookup`, `store`, `retrieve`) cut tokens into chained chunks; segment calls
(`put_segment`, `get_segment`) key a passage by its tokens alone, wherever it appears (for blend/).
KV tensors are plain chunks `[layers, 2, tokens, kv_heads, head_dim]`, post-RoPE, with their positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.format import Entry
from kvstore.keys import Namespace, Tokens, chunk_bounds, token_array
from kvstore.store import TieredStore


@dataclass
class RetrievedKV:
    """The cached prefix: `kv` `[layers, 2, num_tokens, kv_heads, head_dim]` and its `positions`."""

    kv: torch.Tensor
    positions: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[2])


class KVConnector:
    """Prefix and segment KV for one namespace (model + layout + salt) in a shared store.

    `store_partial`: also store the last, shorter chunk of a prompt, so that the same prompt again hits in
    full (a longer prompt sharing it still reuses every full chunk).
    """

    def __init__(self, store: TieredStore, namespace: Namespace, store_partial: bool = True) -> None:
        if not isinstance(store, TieredStore):
            raise TypeError(f"store must be a TieredStore, got {type(store).__name__}")
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace must be a Namespace, got {type(namespace).__name__}")
        self.kvstore = store
        self.namespace = namespace
        self.layout = namespace.layout
        self.store_partial = store_partial

    def _keys(self, tokens: Tokens) -> tuple[list[str], int]:
        ids = token_array(tokens)
        if len(ids) == 0:
            raise ValueError("token list is empty")
        return self.namespace.chunk_keys(ids, partial=self.store_partial), len(ids)

    def _covered(self, chunks: int, num_tokens: int) -> int:
        return min(chunks * self.layout.chunk_tokens, num_tokens)

    def lookup(self, tokens: Tokens) -> int:
        """Length in tokens of the longest cached prefix of `tokens`; moves nothing."""
        keys, n = self._keys(tokens)
        return self._covered(self.kvstore.lookup(keys), n)

    def store(
        self, tokens: Tokens, kv: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0
    ) -> int:
        """Store the KV of `tokens[start:]` (`kv` covers exactly those); cached chunks are skipped.

        `start` must be a multiple of the chunk size (the chunks before it are assumed cached or not
        wanted). `positions` (int64, one per kv token) default to start..n-1. Returns how many chunks were
        written. The KV must match the namespace's layout (shape and dtype) and be contiguous:
        TypeError/ValueError otherwise, and nothing is stored.
        """
        keys, n = self._keys(tokens)
        chunk = self.layout.chunk_tokens
        if not isinstance(start, int) or start < 0 or start % chunk or start >= n:
            raise ValueError(f"start {start!r} must be a multiple of {chunk} in [0, {n})")
        self.layout.check_kv(kv, tokens=n - start)
        positions = self._positions(positions, n - start, offset=start)
        first = max(start // chunk, self.kvstore.lookup(keys))
        bounds = chunk_bounds(n, chunk)
        for i in range(first, len(keys)):
            s, e = bounds[i][0] - start, bounds[i][1] - start
            part = kv[:, :, s:e].clone(memory_format=torch.contiguous_format)
            self.kvstore.put(Entry.plain(keys[i], self.layout, part, positions[s:e].clone()), copy=False)
        return max(len(keys) - first, 0)

    def retrieve(self, tokens: Tokens, device: torch.device | str = "cpu") -> RetrievedKV | None:
        """The KV of the longest cached prefix of `tokens` (None if nothing is cached)."""
        keys, _ = self._keys(tokens)
        parts: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        for key in keys[: self.kvstore.lookup(keys)]:
            entry = self.kvstore.get(key, copy=False)
            if entry is None or entry.positions is None:  # evicted since the lookup (or not a prefix
                break  # chunk: those always carry positions): the prefix ends here
            parts.append(entry.kv)
            positions.append(entry.positions)
        if not parts:
            return None
        kv = torch.cat(parts, dim=2).to(device)  # cat copies: the caller never aliases stored tensors
        return RetrievedKV(kv, torch.cat(positions).to(device))

    def put_segment(
        self, tokens: Tokens, kv: torch.Tensor, positions: torch.Tensor | None = None, pin: bool = False
    ) -> str:
        """Store a passage's KV under its position-free segment key; returns the key."""
        ids = token_array(tokens)
        if len(ids) == 0:
            raise ValueError("token list is empty")
        self.layout.check_kv(kv, tokens=len(ids))
        key = self.namespace.segment_key(ids)
        entry = Entry.plain(key, self.layout, kv, self._positions(positions, len(ids)))
        self.kvstore.put(entry, pin=pin)
        return key

    def get_segment(self, tokens: Tokens) -> Entry | None:
        """A passage's entry (kv, positions it was computed at), or None."""
        return self.kvstore.get(self.namespace.segment_key(tokens))

    def has_segment(self, tokens: Tokens) -> bool:
        return self.kvstore.contains(self.namespace.segment_key(tokens))

    @staticmethod
    def _positions(positions: torch.Tensor | None, n: int, offset: int = 0) -> torch.Tensor:
        if positions is None:
            return torch.arange(offset, offset + n, dtype=torch.int64)
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
            raise TypeError(f"positions must be an int64 tensor, got {positions!r:.80}")
        if tuple(positions.shape) != (n,):
            raise ValueError(f"positions shape {tuple(positions.shape)} does not match {n} tokens")
        return positions.cpu()
