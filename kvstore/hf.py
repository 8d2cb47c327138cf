"""HF transformers adapter: `generate()` that reuses the prompt's cached prefix and stores what it computed.

The cached prefix (post-RoPE keys at positions 0..n-1) becomes a `DynamicCache`; `generate()` then runs
the model only over the remaining prompt tokens. Greedy decoding gives the same tokens as without the
cache. After generation, the prompt's chunks that were not cached are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvstore.connector import KVConnector
from kvstore.keys import Namespace, Tokens, token_array
from kvstore.layout import KVLayout


def namespace_for(loaded: Any, chunk_tokens: int = 256, salt: str = "") -> Namespace:
    """The namespace of a `LoadedModel` (model id + plain layout of its spec + salt)."""
    return Namespace(loaded.model_id, KVLayout.for_spec(loaded.spec, chunk_tokens=chunk_tokens), salt)


@dataclass
class CachedGeneration:
    """What `generate_with_cache` did: the new tokens and how much of the prompt came from the cache."""

    new_tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose KV came from the store
    stored_chunks: int  # chunks of this prompt written to the store afterwards


def to_dynamic_cache(kv: torch.Tensor, config: Any = None) -> DynamicCache:
    """A batch-1 DynamicCache from a store chunk `[layers, 2, tokens, kv_heads, head_dim]`."""
    cache = DynamicCache(config=config)
    # One transposing copy for all layers (per-layer copies cost ~15x more in op overhead); each
    # layer's slice of the result is already contiguous.
    per_layer = kv.permute(0, 1, 3, 2, 4).contiguous().unsqueeze(2)  # [layers, 2, 1, heads, tokens, dim]
    for layer, (k, v) in enumerate(per_layer):
        cache.update(k, v, layer)
    return cache


def from_dynamic_cache(cache: DynamicCache, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of a batch-1 DynamicCache as a store chunk (a new contiguous tensor)."""
    # Any: transformers types a layer as a union including linear-attention layers, which have no
    # keys/values (this model's layers all do)
    layers: list[Any] = list(cache.layers)
    rows = [torch.stack([layer.keys[0, :, start:end], layer.values[0, :, start:end]]) for layer in layers]
    return torch.stack(rows).transpose(2, 3).contiguous()


def generate_with_cache(
    model: Any, connector: KVConnector, prompt: Tokens, max_new_tokens: int = 32, **generate_kwargs: Any
) -> CachedGeneration:
    """Greedy `model.generate()` over `prompt` (token ids), starting from its cached prefix.

    At least the last prompt token is always computed (its logits pick the first new token). Extra
    `generate_kwargs` go to `generate()`; sampling is allowed but then tokens are not reproducible.
    """
    ids = torch.from_numpy(token_array(prompt).astype("int64"))
    if len(ids) == 0:
        raise ValueError("prompt is empty")
    device = next(model.parameters()).device
    reuse, cache = _cached_prefix(model, connector, ids, device)
    generate_kwargs.setdefault("do_sample", False)
    out = model.generate(
        input_ids=ids[None].to(device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    stored = _store_prompt(connector, ids, out.past_key_values, reuse)
    return CachedGeneration(out.sequences[0, len(ids) :].tolist(), len(ids), reuse, stored)


def _cached_prefix(
    model: Any, connector: KVConnector, ids: torch.Tensor, device: torch.device
) -> tuple[int, DynamicCache]:
    hit = connector.retrieve(ids, device=device) if connector.lookup(ids) else None
    reuse = 0 if hit is None else min(hit.num_tokens, len(ids) - 1)
    # Prefix KV is only valid at the positions it was computed at; anything else is blend/'s job.
    if hit is None or reuse == 0 or not torch.equal(hit.positions[:reuse].cpu(), torch.arange(reuse)):
        return 0, DynamicCache(config=model.config)
    return reuse, to_dynamic_cache(hit.kv[:, :, :reuse], model.config)


def _store_prompt(connector: KVConnector, ids: torch.Tensor, cache: DynamicCache, reuse: int) -> int:
    """Store the prompt's chunks from the first one not fully reused."""
    start = reuse - reuse % connector.layout.chunk_tokens
    kv = from_dynamic_cache(cache, start, len(ids)).to(connector.layout.dtype)
    return connector.store(ids, kv, start=start)
