"""Calibrating LouisKV's trigger threshold tau for a model on sample text.

One full-cache greedy decode per prompt records every layer's last query row at every step. The trigger
is then replayed offline for every candidate tau at once (`trigger_rates`): "adjacent" compares q_t with
q_{t-1}, "anchor" with the query of the layer's last retrieval (which resets on each retrieval). The
share of (layer, step) pairs that retrieve is the rate tau would give; the chosen tau is the largest
candidate within the target, overall or per layer. For LouisKV's `scope="step"` (`step_trigger_counts`),
the rate is the share of decode steps that retrieve, with one tau for the deciding layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttnCall, causal_attention
from engine.runner import Engine

TRIGGERS = ("anchor", "adjacent")


@dataclass
class TauCalibration:
    tau: float  # one tau for every layer
    layer_taus: list[float]  # or one per layer, each within the target on its own (scope "step": tau)
    target_rate: float
    trigger: str
    taus: list[float]
    rates: list[float]  # retrieval rate at each candidate tau: share of (layer, step) pairs, or of steps
    samples: int  # (layer, step) pairs measured, or steps (scope "step")
    scope: str = "layer"
    step_layers: int = 1


def decode_queries(engine: Engine, ids: Sequence[int], max_new_tokens: int) -> torch.Tensor:
    """The query `[steps, layers, heads, d]` of every decode step of a full-cache greedy decode of
    `max_new_tokens` after `ids` (max_new_tokens - 1 steps: the first token comes from the prefill)."""
    rows: list[torch.Tensor] = []

    def recording(call: AttnCall) -> torch.Tensor:
        rows.append(call.q[0, :, -1].float().clone())
        return causal_attention(call)

    engine.generate(list(ids), max_new_tokens, attention=recording, stop=set())
    layers = engine.spec.num_layers
    return torch.stack(rows).view(-1, layers, *rows[0].shape)[1:]  # without the prefill's last row


def trigger_rates(queries: torch.Tensor, taus: torch.Tensor, trigger: str) -> torch.Tensor:
    """Retrievals `[taus, layers]` of the trigger replayed on `queries` `[steps, layers, heads, d]`
    (LouisKV always retrieves at step 0; steps 1.. are counted): retrieve when the mean over heads of
    cos(reference, q_t) < tau."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    steps = queries.shape[0]
    ref = queries[0].expand(taus.numel(), *queries.shape[1:]).clone()  # [taus, layers, heads, d]
    count = torch.zeros(taus.numel(), queries.shape[1])
    for t in range(1, steps):
        q = queries[t]
        r = torch.cosine_similarity(ref, q[None], dim=-1).mean(-1)  # [taus, layers]
        hit = r < taus[:, None]
        count += hit
        if trigger == "anchor":
            ref = torch.where(hit[..., None, None], q[None], ref)
        else:
            ref = q[None].expand_as(ref).clone()
    return count


def step_trigger_counts(
    queries: torch.Tensor, taus: torch.Tensor, trigger: str, step_layers: int
) -> torch.Tensor:
    """Retrieving steps `[taus]` of LouisKV's step-level trigger (`scope="step"`) replayed on `queries`
    `[steps, layers, heads, d]` (step 0 always retrieves and is not counted): a step retrieves when any
    of the first `step_layers` layers is below tau. Layer j among them retrieves (and, for "anchor",
    takes q_t as its reference) when some layer <= j is below tau, as LouisKV does."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    if not 1 <= step_layers <= queries.shape[1]:
        raise ValueError(f"step_layers must be in 1..{queries.shape[1]}, got {step_layers}")
    queries = queries[:, :step_layers]
    ref = queries[0].expand(taus.numel(), *queries.shape[1:]).clone()  # [taus, k, heads, d]
    count = torch.zeros(taus.numel())
    for t in range(1, queries.shape[0]):
        q = queries[t]
        below = torch.cosine_similarity(ref, q[None], dim=-1).mean(-1) < taus[:, None]  # [taus, k]
        retrieves = below.cumsum(1) > 0  # layer j retrieves if any layer <= j fired
        count += retrieves[:, -1]
        if trigger == "anchor":
            ref = torch.where(retrieves[..., None, None], q[None], ref)
        else:
            ref = q[None].expand_as(ref).clone()
    return count


def calibrate_tau(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    target_rate: float = 0.3,
    taus: Sequence[float] | None = None,
    trigger: str = "anchor",
    include_first: bool = False,
    scope: str = "layer",
    step_layers: int = 1,
) -> TauCalibration:
    """The largest tau in `taus` whose retrieval rate on `prompts` is at most `target_rate` (overall, and
    per layer).

    `include_first`: count LouisKV's mandatory retrieval at the first decode step in the rate, as
    `RetrievalStats.retrieval_rate` does (one step in `max_new_tokens - 1`, a large share of a short
    answer), so the target bounds the rate LouisKV reports on decodes of this length; by default only
    the trigger's own choices (steps 1..) are counted. `scope="step"`: one tau for LouisKV's step-level
    trigger over the first `step_layers` layers, the rate being the share of retrieving steps."""
    if not prompts:
        raise ValueError("calibrate_tau needs at least one prompt")
    queries = [decode_queries(engine, p, max_new_tokens) for p in prompts]
    return calibrate_queries(queries, target_rate, taus, trigger, include_first, scope, step_layers)


def calibrate_queries(
    queries_per_prompt: Sequence[torch.Tensor],
    target_rate: float = 0.3,
    taus: Sequence[float] | None = None,
    trigger: str = "anchor",
    include_first: bool = False,
    scope: str = "layer",
    step_layers: int = 1,
) -> TauCalibration:
    """`calibrate_tau` on recorded decodes (`decode_queries` of each prompt)."""
    if not queries_per_prompt:
        raise ValueError("calibrate_queries needs at least one decode")
    if not 0.0 < target_rate <= 1.0:
        raise ValueError(f"target_rate must be in (0, 1], got {target_rate}")
    taus = sorted(taus) if taus is not None else [round(0.3 + 0.01 * i, 2) for i in range(70)]
    if scope == "step":
        return _calibrate_steps(queries_per_prompt, target_rate, taus, trigger, include_first, step_layers)
    if scope != "layer":
        raise ValueError(f"scope must be 'layer' or 'step', got {scope!r}")
    grid = torch.tensor(taus)
    counts, steps = torch.zeros(len(taus), queries_per_prompt[0].shape[1]), 0
    for queries in queries_per_prompt:
        counts += trigger_rates(queries, grid, trigger)
        steps += queries.shape[0] - 1
        if include_first:
            counts += 1
            steps += 1
    if steps == 0:
        raise ValueError("no decode steps were measured (max_new_tokens too small?)")
    rates = (counts.sum(1) / (steps * counts.shape[1])).tolist()
    layer_rates = counts / steps  # [taus, layers]
    return TauCalibration(
        tau=_largest_within(taus, rates, target_rate),
        layer_taus=[_largest_within(taus, col.tolist(), target_rate) for col in layer_rates.T],
        target_rate=target_rate,
        trigger=trigger,
        taus=list(taus),
        rates=rates,
        samples=steps * counts.shape[1],
    )


def _calibrate_steps(
    queries_per_prompt: Sequence[torch.Tensor],
    target_rate: float,
    taus: list[float],
    trigger: str,
    include_first: bool,
    step_layers: int,
) -> TauCalibration:
    grid = torch.tensor(taus)
    counts, steps = torch.zeros(len(taus)), 0
    for queries in queries_per_prompt:
        counts += step_trigger_counts(queries, grid, trigger, step_layers)
        steps += queries.shape[0] - 1 + include_first
        counts += include_first
    if steps == 0:
        raise ValueError("no decode steps were measured (max_new_tokens too small?)")
    rates = (counts / steps).tolist()
    tau = _largest_within(taus, rates, target_rate)
    layers = queries_per_prompt[0].shape[1]
    return TauCalibration(
        tau=tau,
        layer_taus=[tau] * layers,
        target_rate=target_rate,
        trigger=trigger,
        taus=list(taus),
        rates=rates,
        samples=steps,
        scope="step",
        step_layers=step_layers,
    )


def _largest_within(taus: Sequence[float], rates: Sequence[float], target: float) -> float:
    fitting = [t for t, rate in zip(taus, rates, strict=True) if rate <= target]
    return fitting[-1] if fitting else taus[0]
