"""Calibrate LouisKV's step-level trigger (scope="step") on the short-answer calibration decodes that
ANSWER_TAU came from (12 MuSiQue questions over their own passages, items 100-111, ~3.7K tokens, 16
tokens decoded; the probes use items 0-59 only). Records the full-cache queries once (to --queries, .npy,
no pickle), then replays the step trigger offline for both triggers and several step_layers, with the
first step counted and not.

Staleness (an offline proxy, not accuracy): the mean over (layer, step) of cos(q_t, the layer's query at
its last retrieval); 1 when every step retrieves. Printed for each calibrated step trigger, for the
per-layer ANSWER_TAU trigger (what `louiskv-follow-512` ran with) and for retrieving every 4th step.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/results/retrieval-2026-12-02/step_calibration.py
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from engine.loader import load_model
from engine.runner import Engine
from retrieval.calibrate import calibrate_queries, decode_queries
from retrieval.louiskv import ANSWER_TAU
from retrieval.tasks import qa_prompts

TAUS = [round(-0.5 + 0.01 * i, 2) for i in range(150)]  # layer 0's cosines may sit below later layers'


def decisions_step(q: torch.Tensor, tau: float, trigger: str, k: int) -> torch.Tensor:
    """[steps, layers] bool: which layers retrieve at each step under the step trigger."""
    steps, layers = q.shape[:2]
    ref = q[0, :k].clone()
    out = torch.zeros(steps, layers, dtype=torch.bool)
    out[0] = True
    for t in range(1, steps):
        below = torch.cosine_similarity(ref, q[t, :k], dim=-1).mean(-1) < tau
        cum = below.cumsum(0) > 0
        out[t, :k] = cum
        out[t, k:] = cum[-1]
        ref = torch.where(cum[:, None, None], q[t, :k], ref) if trigger == "anchor" else q[t, :k].clone()
    return out


def decisions_layer(q: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """[steps, layers] bool under the per-layer adjacent trigger."""
    steps = q.shape[0]
    out = torch.zeros(steps, q.shape[1], dtype=torch.bool)
    out[0] = True
    for t in range(1, steps):
        out[t] = torch.cosine_similarity(q[t - 1], q[t], dim=-1).mean(-1) < taus
    return out


def staleness(q: torch.Tensor, dec: torch.Tensor) -> float:
    ref = q[0].clone()
    total = 0.0
    for t in range(q.shape[0]):
        ref = torch.where(dec[t][:, None, None], q[t], ref)
        total += float(torch.cosine_similarity(ref, q[t], dim=-1).mean())
    return total / q.shape[0]


def summary(queries: list[torch.Tensor], decide) -> dict[str, float]:
    decs = [decide(q) for q in queries]
    return dict(
        layer_step_rate=float(torch.cat(decs).float().mean()),
        step_rate=float(torch.cat([d.any(1) for d in decs]).float().mean()),
        step_rate_after_first=float(torch.cat([d[1:].any(1) for d in decs]).float().mean()),
        staleness=sum(staleness(q, d) for q, d in zip(queries, decs, strict=True)) / len(queries),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", default="/tmp/ret7_step_queries.npy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if os.path.exists(args.queries):
        stacked = torch.from_numpy(np.load(args.queries, allow_pickle=False))
    else:
        engine = Engine(load_model())
        prompts = qa_prompts(engine.tokenizer, 4096, slice(100, 112))
        stacked = torch.stack([decode_queries(engine, p, 16) for p in prompts])
        np.save(args.queries, stacked.numpy(), allow_pickle=False)
    queries = list(stacked)  # one [steps, layers, heads, d] per prompt
    for trigger in ("adjacent", "anchor"):
        for k in (1, 2, 3, 4, 6, 10):
            for first in (True, False):
                cal = calibrate_queries(queries, 0.3, TAUS, trigger, first, scope="step", step_layers=k)
                row = dict(trigger=trigger, step_layers=k, include_first=first, tau=cal.tau)
                row.update(calibrated_rate=cal.rates[cal.taus.index(cal.tau)])
                row.update(summary(queries, lambda q, c=cal, t=trigger, k=k: decisions_step(q, c.tau, t, k)))
                print(json.dumps(row), flush=True)
    taus = torch.tensor(ANSWER_TAU)
    print(
        json.dumps(
            dict(trigger="per-layer ANSWER_TAU", **summary(queries, lambda q: decisions_layer(q, taus)))
        )
    )
    every4 = lambda q: (torch.arange(q.shape[0]) % 4 == 0)[:, None].expand(-1, q.shape[1])  # noqa: E731
    print(json.dumps(dict(trigger="every 4th step", **summary(queries, every4))))
    print(
        json.dumps(
            dict(
                trigger="every step", **summary(queries, lambda q: torch.ones(q.shape[:2], dtype=torch.bool))
            )
        )
    )


if __name__ == "__main__":
    main()
