"""A one-hidden-layer network over a few standardized features: trained with torch, run with numpy.

The verifier's networks are this small (tens of inputs, 32 hidden units), so inference is a pair of
matrix products in numpy (microseconds; the cache does not need torch for it) and the weights are
plain arrays (saved as safetensors by semcache/verify.py, no pickle). This is the only training loop
the semantic cache has: the verifier's fit and the validation experiments all call `fit_mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np


@dataclass
class Mlp:
    """logit(x) = relu(((x - mean) / std) @ w1 + b1) @ w2 + b2"""

    mean: np.ndarray  # [features]
    std: np.ndarray  # [features]
    w1: np.ndarray  # [features, hidden]
    b1: np.ndarray  # [hidden]
    w2: np.ndarray  # [hidden]
    b2: float

    def __post_init__(self) -> None:
        n, h = self.w1.shape
        if (
            self.mean.shape != (n,)
            or self.std.shape != (n,)
            or self.b1.shape != (h,)
            or self.w2.shape != (h,)
        ):
            raise ValueError(
                f"network shapes disagree: w1 {self.w1.shape}, mean {self.mean.shape}, std {self.std.shape}, "
                f"b1 {self.b1.shape}, w2 {self.w2.shape}"
            )

    @property
    def n_features(self) -> int:
        return int(self.w1.shape[0])

    def logits(self, X: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(X).astype(np.float32) - self.mean) / self.std
        return np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2}
        out = {f"{prefix}{k}": np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
        out[f"{prefix}b2"] = np.array([self.b2], np.float32)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str) -> Mlp:
        def get(k: str) -> np.ndarray:
            return np.asarray(t[f"{prefix}{k}"], np.float32)

        return cls(get("mean"), get("std"), get("w1"), get("b1"), get("w2"), float(get("b2")[0]))


@dataclass(frozen=True)
class MlpParams:
    hidden: int = 32
    epochs: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"hidden, epochs, batch_size and lr must be positive, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def fit_mlp(X: np.ndarray, y: np.ndarray, params: MlpParams | None = None, seed: int = 0) -> Mlp:
    """Binary cross-entropy, AdamW, dropout, shuffled mini-batches; seconds for ~10k rows on one core."""
    import torch

    p = params or MlpParams()
    X, y = np.asarray(X, np.float32), np.asarray(y, np.float32)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"need X [rows, features] and one label per row, got {X.shape} and {y.shape}")
    mean, std = X.mean(axis=0), X.std(axis=0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], p.hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(p.dropout),
        torch.nn.Linear(p.hidden, 1),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    Z, Y = torch.from_numpy((X - mean) / std), torch.from_numpy(y)
    net.train()
    for _ in range(p.epochs):
        for idx in torch.randperm(len(Z), generator=gen).split(p.batch_size):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Z[idx]).squeeze(1), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    lin1, lin2 = cast(torch.nn.Linear, net[0]), cast(torch.nn.Linear, net[3])
    return Mlp(
        mean,
        std,
        lin1.weight.detach().numpy().T.copy(),
        lin1.bias.detach().numpy().copy(),
        lin2.weight.detach().numpy()[0].copy(),
        float(lin2.bias.item()),
    )
