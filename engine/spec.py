"""ModelSpec: the shape of a Llama-family model, read from its HF config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Architectures whose decoder layer is exactly Llama's (q/k/v/o projections, RMSNorm, gated MLP, RoPE).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | None = None) -> ModelSpec:
        theta, scaling = _rope_of(config)
        heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            rope_theta=theta,
            rope_scaling=scaling,
            dtype=dtype or _dtype_of(config),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }


def _rope_of(config: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
        theta = float(params.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
        scaling = None if params.get("rope_type", "default") == "default" else params
        return theta, scaling
    scaling = getattr(config, "rope_scaling", None)
    return float(getattr(config, "rope_theta", 10000.0)), dict(scaling) if scaling else None


def _dtype_of(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
