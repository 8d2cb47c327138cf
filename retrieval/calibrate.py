"""Calibrating LouisKV's trigger threshold tau for a model on sample text.

One full-cache greedy decode per prompt records r_t (mean over query heads of cos(q_{t-1}, q_t)) at every
layer and step; the share of (layer, step) pairs with r_t < tau is then the retrieval rate tau would give,
for every candidate tau at once. The chosen tau is the largest candidate whose rate stays within target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttnCall, causal_attention
from engine.runner import Engine


@dataclass
class TauCalibration:
    tau: float
    target_rate: float
    taus: list[float]
    rates: list[float]  # retrieval rate (share of (layer, step) pairs) at each candidate tau
    samples: int  # (layer, step) pairs measured


def query_similarity(engine: Engine, ids: Sequence[int], max_new_tokens: int) -> torch.Tensor:
    """r_t `[steps, layers]` over a full-cache greedy decode of `max_new_tokens` after `ids`."""
    prev: dict[int, torch.Tensor] = {}
    rows: list[torch.Tensor] = []

    def recording(call: AttnCall) -> torch.Tensor:
        q = call.q[0, :, -1]
        if call.q.shape[2] == 1 and call.layer in prev:
            rows.append(torch.cosine_similarity(prev[call.layer], q, dim=-1).mean())
        prev[call.layer] = q.clone()
        return causal_attention(call)

    engine.generate(list(ids), max_new_tokens, attention=recording, stop=set())
    layers = engine.spec.num_layers
    return torch.stack(rows).view(-1, layers) if rows else torch.empty(0, layers)


def calibrate_tau(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    target_rate: float = 0.3,
    taus: Sequence[float] | None = None,
) -> TauCalibration:
    """The largest tau in `taus` whose retrieval rate on `prompts` is at most `target_rate`."""
    if not prompts:
        raise ValueError("calibrate_tau needs at least one prompt")
    if not 0.0 < target_rate <= 1.0:
        raise ValueError(f"target_rate must be in (0, 1], got {target_rate}")
    taus = sorted(taus) if taus is not None else [round(0.5 + 0.01 * i, 2) for i in range(50)]
    r = torch.cat([query_similarity(engine, p, max_new_tokens).flatten() for p in prompts])
    if r.numel() == 0:
        raise ValueError("no decode steps were measured (max_new_tokens too small?)")
    rates = [float((r < t).float().mean()) for t in taus]
    fitting = [t for t, rate in zip(taus, rates, strict=True) if rate <= target_rate]
    tau = fitting[-1] if fitting else taus[0]
    return TauCalibration(tau, target_rate, list(taus), rates, int(r.numel()))
