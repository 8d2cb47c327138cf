"""The compressor interface, shaped like kvpress's press, and the compressed-layer contract.

A compressor turns one layer's prompt K/V (post-RoPE `[batch, kv_heads, tokens, head_dim]`) into a
`CompressedLayer`: a `LayerKV` subclass that really holds fewer bytes, keeps accepting new rows
(`update`) and knows how to attend over itself (`attend`). Unlike kvpress, whose `compress` returns
(keys, values) of the same dense shape, ours returns the layer object: ThinK's keys have two widths and
Chelsea's heads may hold different numbers of (merged) tokens, which no dense pair can express.

It is used two ways (compress/runtime.py): during the engine's prefill, layer by layer right after that
layer's attention (`compressing(engine, compressor)`), or offline on a finished or stored cache
(`compress_cache`). Every compressed layer reports its real bytes (`nbytes`), so a cache's compression
ratio is measured, never assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from engine.attention import AttnCall
from engine.kvcache import LayerKV


class CompressedLayer(LayerKV):
    """A layer's KV in a compressed form. Subclasses are dataclasses and implement these four."""

    method: ClassVar[str]

    @property
    def tokens(self) -> int:
        """Original tokens this layer covers (merged or pruned ones included)."""
        raise NotImplementedError

    def attend(self, call: AttnCall) -> torch.Tensor:
        """Attention output `[batch, heads, rows, head_dim]` of `call.q` over this layer."""
        raise NotImplementedError

    def dense_nbytes(self) -> int:
        """Bytes the same tokens take uncompressed (the denominator of the compression ratio)."""
        raise NotImplementedError

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Named batch-1 tensors (batch dim dropped) that the compressor's `restore` rebuilds it from."""
        raise NotImplementedError


@dataclass
class Compressor(ABC):
    """Base of every method: a small dataclass whose parameters are validated in `__post_init__`."""

    method: ClassVar[str]

    def observation_rows(self) -> int:
        """How many of the prompt's last query rows `compress` wants in `kwargs["queries"]` (0: none)."""
        return 0

    @abstractmethod
    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> LayerKV:
        """One layer's compressed KV.

        module: the HF attention module of the layer (weights, config). hidden_states: the attention
        input of the observation rows `[batch, window, hidden]` (None when `observation_rows()` is 0).
        keys/values: the layer's whole prompt, post-RoPE. attentions: not materialized (None).
        kwargs: "layer" (index), "queries" (post-RoPE `[batch, heads, window, head_dim]` or None),
        "positions" (`[tokens]`), "position_embeddings" ((cos, sin) of the window rows).
        """

    def restore(self, tensors: dict[str, torch.Tensor], tokens: int) -> CompressedLayer:
        """The layer `CompressedLayer.to_tensors` described (batch dim added back), covering `tokens`."""
        raise TypeError(f"{self.method} layers cannot be restored from stored tensors")

    def params(self) -> dict[str, Any]:
        """The parameters, as recorded in a stored entry's layout."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Compressor:
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown {cls.method} parameters {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**params)


REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a method reachable by its name (stored layouts, the CLI, the bench)."""
    REGISTRY[cls.method] = cls
    return cls


def compressor_for(method: str, params: dict[str, Any] | None = None) -> Compressor:
    """The compressor a stored layout names; ValueError naming the unknown method."""
    if method not in REGISTRY:
        raise ValueError(f"unknown compression method {method!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[method].from_params(dict(params or {}))


def check_fraction(name: str, value: float, low: float, high: float, high_open: bool) -> float:
    """`value` as a float in [low, high) or [low, high]; ValueError naming the parameter otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_keep(value: float) -> float:
    """A kept fraction in (0, 1]: ValueError naming `keep` (0 or less would leave no token)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise ValueError(f"keep must lie in (0, 1], got {value!r}: it would leave no token")
    return check_fraction("keep", value, 0.0, 1.0, high_open=False)


def check_count(name: str, value: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors if t is not None)


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[batch, heads, rows, dim]` -> `[batch, kv_heads, group, rows, dim]` (HF's repeat_kv order)."""
    b, h, r, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, r, d)


def tail_mask(q_index: torch.Tensor, tail_start: int, tail_rows: int) -> torch.Tensor | None:
    """Additive [rows, tail_rows] mask: tail key j (token tail_start + j) is visible to row i iff causal."""
    idx = torch.arange(tail_rows, device=q_index.device) + tail_start
    allowed = idx[None, :] <= q_index[:, None]
    if bool(allowed.all()):
        return None
    zero = torch.zeros((), device=q_index.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), device=q_index.device))


def scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[b, kv, g, rows, d]` . k `[b, kv, n, d]` -> `[b, kv, g, rows, n]` as one plain batched matmul
    (broadcasting k over the group would make torch copy it on every decode step)."""
    b, kv, g, r, d = q.shape
    return (q.reshape(b, kv, g * r, d) @ k.transpose(-1, -2)).view(b, kv, g, r, -1) * scale


def attend_parts(scores: list[torch.Tensor], values: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One softmax over several key groups: scores `[b, kv, g, rows, n_i]`, values `[b, kv, n_i, dim]`.

    Returns `[b, kv*g, rows, dim]`. Keeping the groups apart avoids copying keys of different widths
    (ThinK) or different per-head lengths (Chelsea) into one tensor on every decode step.
    """
    b, kv, g, r, _ = scores[0].shape
    probs = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(dtype).view(b, kv, g * r, -1)
    out, at = None, 0
    for s, v in zip(scores, values, strict=True):
        n = s.shape[-1]
        part = probs[..., at : at + n] @ v
        out = part if out is None else out + part
        at += n
    return out.view(b, kv, g, r, -1).reshape(b, kv * g, r, -1)
