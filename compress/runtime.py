"""Running compressors with the engine: during prefill, offline on a cache, and decoding afterwards.

Prefill: `with compressing(engine, compressor) as press: engine.forward(ids, cache=press.cache, hook=press)`
(or `prefill(...)`). The hook records each layer's observation window, and compresses layer i-1 when
layer i starts, i.e. right after layer i-1's attention: the prompt's own attention is exact and at most
one layer is held uncompressed. Offline: `compress_cache` compresses a finished (or stored) plain cache,
recomputing the observation window's queries from its last tokens if none were recorded.
Decode: pass `attention=attend` to `Engine.forward`/`decode`; compressed layers attend over themselves,
plain ones use the exact causal attention. The cache keeps every original position, so a continuation
starts at the original length (`cache.next_position`), however few tokens remain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from compress.base import CompressedLayer, Compressor
from engine.attention import AttnCall, causal_attention
from engine.kvcache import KVCache, LayerKV
from engine.runner import Engine, ForwardOutput, LayerStep


def attend(call: AttnCall) -> torch.Tensor:
    """The attention function for caches that mix compressed and plain layers."""
    if isinstance(call.kv, CompressedLayer):
        return call.kv.attend(call)
    return causal_attention(call)


@dataclass
class Observation:
    """One layer's last prompt rows, as a compressor sees them."""

    queries: torch.Tensor  # [batch, heads, window, head_dim] post-RoPE
    hidden: torch.Tensor  # [batch, window, hidden] the attention module's input (after input_layernorm)
    cos_sin: tuple[torch.Tensor, torch.Tensor]  # RoPE of the window rows


class Observer:
    """A LayerHook recording every layer's `Observation` of the last `rows` rows."""

    def __init__(self, engine: Engine, rows: int) -> None:
        self.engine, self.rows = engine, rows
        self.seen: dict[int, Observation] = {}

    def __call__(self, step: LayerStep) -> None:
        if self.rows <= 0:
            return
        w = min(self.rows, step.q.shape[2])
        norm = self.engine.layers[step.layer].input_layernorm
        self.seen[step.layer] = Observation(
            step.q[:, :, -w:].clone(),
            norm(step.hidden[:, -w:]),
            self.engine.rope(step.positions[-w:]),
        )


@torch.inference_mode()
def compress_layer(
    engine: Engine, compressor: Compressor, layer: int, kv: LayerKV, seen: Observation | None, positions
) -> LayerKV:
    if type(kv) is not LayerKV:
        raise TypeError(
            f"layer {layer} is a {type(kv).__name__}; only plain LayerKV layers can be compressed"
        )
    if compressor.observation_rows() and seen is None:
        raise ValueError(f"{compressor.method} needs layer {layer}'s observation window, none was recorded")
    kwargs = {
        "layer": layer,
        "queries": None if seen is None else seen.queries,
        "positions": positions,
        "position_embeddings": None if seen is None else seen.cos_sin,
    }
    module = engine.layers[layer].self_attn
    hidden = None if seen is None else seen.hidden
    return compressor.compress(module, hidden, kv.k, kv.v, None, kwargs)


class CompressingHook(Observer):
    """Prefill hook that compresses each layer right after its attention (see `compressing`)."""

    def __init__(self, engine: Engine, compressor: Compressor, cache: KVCache) -> None:
        super().__init__(engine, compressor.observation_rows())
        self.compressor, self.cache = compressor, cache
        self.done: set[int] = set()

    def __call__(self, step: LayerStep) -> None:
        super().__call__(step)
        if step.layer > 0:
            self._compress(step.layer - 1)

    def _compress(self, i: int) -> None:
        if i in self.done:
            return
        layers, seen = self.cache.layers, self.seen.pop(i, None)
        layers[i] = compress_layer(self.engine, self.compressor, i, layers[i], seen, self.cache.positions)
        self.done.add(i)

    def finish(self) -> None:
        for i in range(len(self.cache.layers)):
            self._compress(i)


@contextmanager
def compressing(
    engine: Engine, compressor: Compressor, cache: KVCache | None = None
) -> Iterator[CompressingHook]:
    """Compress a prefill: every layer of `press.cache` is compressed when the block exits."""
    cache = cache if cache is not None else engine.new_cache()
    for i, layer in enumerate(cache.layers):
        if type(layer) is not LayerKV:
            raise TypeError(
                f"cache layer {i} is already a {type(layer).__name__}; prefill into a plain cache"
            )
    press = CompressingHook(engine, compressor, cache)
    yield press
    press.finish()


def prefill(engine: Engine, ids, compressor: Compressor, logits: str = "last") -> ForwardOutput:
    """Prefill `ids` into a fresh cache that ends compressed by `compressor`."""
    with compressing(engine, compressor) as press:
        out = engine.forward(ids, cache=press.cache, hook=press, logits=logits)
    return out


def observe(engine: Engine, ids, rows: int = 32) -> tuple[ForwardOutput, dict[int, Observation]]:
    """A plain prefill that also records every layer's observation window (to compress it many ways)."""
    observer = Observer(engine, rows)
    return engine.forward(ids, hook=observer), observer.seen


def recompute_observations(engine: Engine, cache: KVCache, ids, rows: int) -> dict[int, Observation]:
    """The last `rows` queries of a finished plain cache, by re-running those tokens on the rest of it."""
    ids = torch.as_tensor(ids).view(-1)
    if ids.numel() != len(cache):
        raise ValueError(f"{ids.numel()} token ids for a cache of {len(cache)} tokens")
    w = min(rows, len(cache))
    head = len(cache) - w
    layers = [LayerKV(lay.k[..., :head, :], lay.v[..., :head, :]) for lay in cache.layers]
    observer = Observer(engine, rows)
    engine.forward(
        ids[head:],
        cache=KVCache(layers, cache.positions[:head]),
        positions=cache.positions[head:],
        hook=observer,
        logits="none",
    )
    return observer.seen


def compress_cache(
    engine: Engine,
    cache: KVCache,
    compressor: Compressor,
    seen: dict[int, Observation] | None = None,
    ids=None,
) -> KVCache:
    """A compressed copy of a plain `cache` (left unchanged). Methods that score with queries need
    `seen` (from `observe`) or the cache's token `ids` to recompute them."""
    rows = compressor.observation_rows()
    if rows and seen is None:
        if ids is None:
            raise ValueError(f"{compressor.method} needs `seen` observations or the cache's token `ids`")
        seen = recompute_observations(engine, cache, ids, rows)
    seen = seen or {}
    layers = [
        compress_layer(engine, compressor, i, lay, seen.get(i), cache.positions)
        for i, lay in enumerate(cache.layers)
    ]
    return KVCache(layers, cache.positions.clone())


def kv_bytes(cache: KVCache) -> tuple[int, int]:
    """(bytes held, bytes the same tokens take uncompressed)."""
    held = dense = 0
    for layer in cache.layers:
        held += layer.nbytes()
        dense += layer.dense_nbytes() if isinstance(layer, CompressedLayer) else layer.nbytes()
    return held, dense


def kv_ratio(cache: KVCache) -> float:
    """Bytes held / uncompressed bytes: the real compression ratio (1.0 = nothing saved)."""
    held, dense = kv_bytes(cache)
    return held / dense if dense else 1.0
