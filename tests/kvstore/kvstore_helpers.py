"""Small layouts and entries shared by the kvstore tests."""

from __future__ import annotations

import torch

from kvstore import Entry, KVLayout

# The default model's layout (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64) with short chunks so the
# tests stay small; 16 tokens of fp16 = 184,320 bytes per chunk.
SMOL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float16, chunk_tokens=16)
TINY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, chunk_tokens=4)


def tiny_entry(key: str, tokens: int = 4, seed: int = 0) -> Entry:
    """A TINY plain entry with reproducible values (2*2*tokens*2*4 floats = 128*tokens/4 bytes)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(TINY.chunk_shape(tokens), generator=g)
    return Entry.plain(key, TINY, kv, torch.arange(tokens, dtype=torch.int64))


ENTRY_BYTES = tiny_entry("x").nbytes  # tensor + positions bytes of one 4-token TINY entry
