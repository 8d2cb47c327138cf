"""Re-positioning of cached post-RoPE keys: rotate each key by `delta = p_new - p_old`.

RoPE rotates each channel pair by `p * inv_freq`, so `RoPE(RoPE(k, a), b) == RoPE(k, a + b)`: a key cached
at position a moves to position a + delta by one more rotation, with no need for the pre-RoPE key.
That holds only when cos/sin carry no extra attention factor (default, linear and llama3 scaling) and
the frequencies do not depend on the sequence length (not "dynamic"); other types are refused by name.
Values carry no position and never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# RoPE types whose cos/sin are a pure rotation by position * inv_freq, with fixed inv_freq.
PURE_ROTATION_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeShift:
    """Rotates post-RoPE keys `[..., tokens, head_dim]` by a per-token position delta."""

    inv_freq: torch.Tensor  # [head_dim // 2], the model's RoPE frequencies

    def __post_init__(self) -> None:
        if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.dim() != 1:
            raise ValueError(f"inv_freq must be a 1-D tensor, got {self.inv_freq!r:.80}")

    @classmethod
    def for_theta(cls, theta: float, head_dim: int) -> RopeShift:
        """Plain RoPE (no scaling) with base `theta`."""
        if theta <= 0 or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"need theta > 0 and an even head_dim > 0, got {theta}, {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return cls((1.0 / theta**exponents).float())

    @classmethod
    def for_engine(cls, engine: Any) -> RopeShift:
        """The shift for an `engine.runner.Engine`'s own rotary embedding (its inv_freq, its scaling)."""
        rotary = engine.rotary
        rope_type = getattr(rotary, "rope_type", "default")
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        check_rope_type(rope_type, scaling)
        return cls(rotary.inv_freq.detach().float().cpu())

    def cos_sin(self, delta: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[tokens, head_dim]` of the rotation by `delta` (angles in float64: deltas of a few
        thousand positions would lose ~1e-4 rad in float32)."""
        angles = delta.to(torch.float64).cpu()[:, None] * self.inv_freq.to(torch.float64)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(device), angles.sin().to(device)

    def shift(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """`keys` rotated by `delta` positions (one delta, or one per token along dim -2)."""
        tokens, head_dim = keys.shape[-2], keys.shape[-1]
        if head_dim != 2 * self.inv_freq.numel():
            raise ValueError(f"keys have head_dim {head_dim}, the RoPE has {2 * self.inv_freq.numel()}")
        delta = torch.as_tensor(delta, dtype=torch.long)
        if delta.dim() == 0:
            delta = delta.expand(tokens)
        if delta.shape != (tokens,):
            raise ValueError(f"delta must be one int or {tokens} ints, got shape {tuple(delta.shape)}")
        if not bool(delta.any()):
            return keys
        return self.rotate(keys, *self.cos_sin(delta, keys.device))

    @staticmethod
    def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply a rotation from `cos_sin` (reuse it across layers: the deltas are the same)."""
        k = keys if keys.dtype in (torch.float32, torch.float64) else keys.float()
        cos, sin = cos.to(k.dtype), sin.to(k.dtype)
        return (k * cos + rotate_half(k) * sin).to(keys.dtype)

    def move(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Keys computed at positions `old` re-positioned to `new` (both `[tokens]`)."""
        if old.shape != new.shape:
            raise ValueError(
                f"old and new positions differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}"
            )
        return self.shift(keys, new.cpu().long() - old.cpu().long())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_rope_type(rope_type: str, attention_scaling: float = 1.0) -> None:
    """ValueError unless cached keys of this RoPE can be moved by a rotation alone."""
    if rope_type not in PURE_ROTATION_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} cannot be re-positioned by rotation (its frequencies or attention "
            f"factor change with length); supported: {', '.join(PURE_ROTATION_TYPES)}"
        )
    if abs(attention_scaling - 1.0) > 1e-6:
        raise ValueError(
            f"RoPE type {rope_type!r} has attention factor {attention_scaling}; re-positioning needs 1.0"
        )
