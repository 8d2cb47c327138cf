"""A compressed cache as one kvstore entry, and back.

The entry's layout is the plain layout `with_method(method, **params)`, so a compressed entry never
shares a key with the plain KV of the same tokens, and the method can be rebuilt from the entry alone.
Its tensors are the layers' named tensors stacked over layers (`[layers, ...]`, batch 1); the store
counts their real bytes, so its usage shows the saving.
"""

from __future__ import annotations

import torch

from compress.base import CompressedLayer, Compressor, compressor_for
from engine.kvcache import KVCache
from kvstore.format import Entry
from kvstore.layout import KVLayout


def compressed_layout(plain: KVLayout, compressor: Compressor) -> KVLayout:
    return plain.with_method(compressor.method, **compressor.params())


def to_entry(key: str, cache: KVCache, plain: KVLayout, compressor: Compressor) -> Entry:
    """One entry holding every layer of a batch-1 compressed `cache`."""
    layers = cache.layers
    if len(layers) != plain.num_layers:
        raise ValueError(f"cache has {len(layers)} layers, the layout {plain.num_layers}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, CompressedLayer) or layer.method not in (compressor.method, "tokenset"):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, not a {compressor.method} layer")
        if layer.v.shape[0] != 1:
            raise ValueError(f"only batch-1 caches can be stored, got batch {layer.v.shape[0]}")
    named = [layer.to_tensors() for layer in layers]
    tensors = {name: _stack(name, [n[name] for n in named]) for name in named[0]}
    layout = compressed_layout(plain, compressor)
    return Entry(key, layout, tensors, cache.positions.cpu().clone(), {"num_tokens": len(cache)})


def _stack(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"tensor {name!r} differs in shape across layers: {sorted(shapes)}")
    return torch.stack(parts).cpu().contiguous()


def from_entry(entry: Entry, device: torch.device | str = "cpu") -> KVCache:
    """The compressed cache an entry holds, on `device`, ready to decode with `attention=attend`."""
    compressor = compressor_for(entry.layout.method, dict(entry.layout.params))
    if entry.positions is None:
        raise ValueError(f"entry {entry.key} has no positions; a compressed entry always records them")
    tokens = int(entry.positions.numel())
    layers = []
    for i in range(entry.layout.num_layers):
        parts = {name: t[i].to(device) for name, t in entry.tensors.items()}
        layers.append(compressor.restore(parts, tokens))
    return KVCache(layers, entry.positions.to(device).clone())
