"""KVLayout: what one stored chunk of KV looks like, and therefore part of every key's namespace.

A plain chunk is one tensor `[num_layers, 2, tokens, num_kv_heads, head_dim]` (2 = key, value) in `dtype`.
A compressed chunk (compress/) keeps the same layout fields but names its `method` and `params`; its
entry then carries whatever named tensors the method needs (shapes may differ, e.g. pruned key channels).
Because the method and params are in the layout and the layout is in the namespace, a plain and a
compressed entry for the same tokens never share a key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Names on disk and on the wire; torch dtypes are not serializable and their str() is not an API.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}

PLAIN = "plain"


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a torch dtype; TypeError for dtypes the store cannot hold."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored; allowed: {sorted(DTYPES_BY_NAME)}") from None


def dtype_from_name(name: Any) -> torch.dtype:
    """The torch dtype for a stored name; ValueError for unknown names."""
    if not isinstance(name, str):
        raise ValueError(f"dtype must be a name (str), got {name!r:.80}; allowed: {sorted(DTYPES_BY_NAME)}")
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; allowed: {sorted(DTYPES_BY_NAME)}") from None


def _freeze(params: Any) -> tuple[tuple[str, Any], ...]:
    """Params as a sorted tuple of (name, value) pairs so the layout stays hashable and stable."""
    items = params.items() if isinstance(params, dict) else params
    frozen = []
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError(f"layout param names must be str, got {name!r}")
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, (str, int, float, bool, tuple, type(None))):
            raise TypeError(f"layout param {name!r} has unsupported value {value!r} ({type(value).__name__})")
        frozen.append((name, value))
    return tuple(sorted(frozen))


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of one chunk of KV, plus how it is encoded.

    Fields:
        num_layers: transformer layers (SmolLM2-135M: 30).
        num_kv_heads: key/value heads per layer (SmolLM2-135M: 3).
        head_dim: channels per head (SmolLM2-135M: 64).
        dtype: element dtype of the plain KV (the model's dtype).
        chunk_tokens: tokens per prefix chunk (default 256); the last chunk of a prompt may be shorter.
        method: "plain" for an uncompressed `[layers, 2, tokens, heads, dim]` tensor, or the name of a
            compressor (compress/); the entry's tensors are then the compressor's business.
        params: the compressor's parameters (name -> str/int/float/bool/tuple), part of the namespace.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    chunk_tokens: int = 256
    method: str = PLAIN
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"KVLayout.dtype must be a torch.dtype, got {self.dtype!r}")
        dtype_name(self.dtype)
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"KVLayout.method must be a non-empty str, got {self.method!r}")
        object.__setattr__(self, "params", _freeze(self.params))

    @classmethod
    def for_spec(cls, spec: Any, chunk_tokens: int = 256, dtype: torch.dtype | None = None) -> KVLayout:
        """The plain layout for a model spec (anything with num_layers, num_kv_heads, head_dim, dtype)."""
        return cls(
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=dtype or spec.dtype,
            chunk_tokens=chunk_tokens,
        )

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a plain KV tensor for `tokens` tokens."""
        return (self.num_layers, 2, tokens, self.num_kv_heads, self.head_dim)

    def chunk_nbytes(self, tokens: int) -> int:
        """Bytes of a plain KV tensor for `tokens` tokens."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * tokens * self.num_kv_heads * self.head_dim * elem

    def with_method(self, method: str, **params: Any) -> KVLayout:
        """The same layout encoded by another method (a compressor) with its parameters."""
        return KVLayout(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.chunk_tokens,
            method,
            _freeze(params),
        )

    def check_kv(self, kv: torch.Tensor, tokens: int | None = None) -> None:
        """Raise TypeError/ValueError unless `kv` is a contiguous plain KV tensor of this layout."""
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if self.method != PLAIN:
            raise ValueError(f"check_kv is for plain layouts; this layout's method is {self.method!r}")
        if kv.dtype != self.dtype:
            raise TypeError(f"kv dtype {kv.dtype} does not match the layout's {self.dtype}")
        n = tokens if tokens is not None else (kv.shape[2] if kv.dim() == 5 else "T")
        if kv.dim() != 5 or tuple(kv.shape) != self.chunk_shape(kv.shape[2]) or kv.shape[2] != n:
            raise ValueError(
                f"kv shape {tuple(kv.shape)} does not match the layout "
                f"[layers={self.num_layers}, 2, tokens={n}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}]"
            )
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous (call .contiguous() first)")

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-friendly description (used in entry headers and the namespace hash)."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": dtype_name(self.dtype),
            "chunk_tokens": self.chunk_tokens,
            "method": self.method,
            "params": [list(p) for p in self.params],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        """Inverse of to_dict; ValueError naming the field when one is missing or bad."""
        if not isinstance(d, dict):
            raise ValueError(f"layout must be a map, got {type(d).__name__}")
        params = d.get("params", ())
        if not isinstance(params, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in params
        ):
            raise ValueError(f"layout params must be a list of [name, value] pairs, got {params!r:.100}")
        try:
            return cls(
                num_layers=d["num_layers"],
                num_kv_heads=d["num_kv_heads"],
                head_dim=d["head_dim"],
                dtype=dtype_from_name(d["dtype"]),
                chunk_tokens=d["chunk_tokens"],
                method=d.get("method", PLAIN),
                params=tuple(tuple(p) for p in params),
            )
        except KeyError as e:
            raise ValueError(f"layout is missing field {e.args[0]!r}: {d!r}") from None
