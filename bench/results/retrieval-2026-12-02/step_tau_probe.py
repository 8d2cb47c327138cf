"""Diagnostic, not a calibration: does the step-level trigger with follow keep the needles it lost at
STEP_TAU (needle 0.5 and 0.7 of seed 1, 0.9 of seed 2, 4K, budget 512) when a higher tau makes it
retrieve on more steps? The taus are chosen after seeing the probes, so the accuracy is not a result.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/results/retrieval-2026-12-02/step_tau_probe.py
"""

from __future__ import annotations

import json
import time

import torch

from engine.loader import load_model
from engine.runner import Engine
from retrieval.bench import FOLLOW, _hit, _louiskv_run, _probe_seed
from retrieval.louiskv import LouisKVConfig
from retrieval.tasks import needle, passages

PROBES = ((1, 0.5), (1, 0.7), (2, 0.9))
TAUS = (0.75, 0.85)


def main() -> None:
    torch.set_num_threads(1)
    engine = Engine(load_model())
    texts = passages(limit=60)
    for seed, depth in PROBES:
        probe = needle(engine.tokenizer, texts, 4096, depth, seed=_probe_seed(depth, seed))
        out = engine.forward(probe.ids)
        first = None
        for tau in TAUS:
            cfg = LouisKVConfig(budget=512, tau=tau, scope="step", follow=FOLLOW)
            new, ms, stats, r = _louiskv_run(engine, out, 16, cfg, first)
            row = dict(seed=seed, depth=depth, tau=tau, correct=_hit(engine, new, probe.answer))
            row.update(
                step_rate=stats["step_retrieval_rate"], after_first=stats["step_retrieval_rate_after_first"]
            )
            row.update(text=engine.tokenizer.decode(new), utc=time.strftime("%H:%M", time.gmtime()))
            print(json.dumps(row), flush=True)
            if first is None:
                first = r
            else:
                r.release()
        first.release()


if __name__ == "__main__":
    main()
