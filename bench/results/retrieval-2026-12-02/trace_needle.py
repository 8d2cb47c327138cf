"""Trace LouisKV needle losses: per (layer, step) retrieval and needle-digit residency (the run's trace.log).

    PYTHONPATH=. .venv/bin/python bench/results/retrieval-2026-12-02/trace_needle.py 0.9:0,0.5:1 \
        '{"anchor": {"trigger": "anchor"}}'   # needle probes (depth:seed) at 4K; extra LouisKVConfig(...)s

For each needle probe (the bench's, budget 512): the full cache's tokens, then per method its answer and
rates, and per decode step (input -> output, the full cache's output) how many of the 30 layers
re-selected and, for every layer holding fewer of the number's digit tokens than every-step retrieval
at that step, `L<layer><R: re-selected now | -: reused><digits held>/<every-step's>@<its last
re-selection step>` (digits held = the minimum over KV heads of the digits resident in sinks, window or
working set).
"""

import json
import sys
import time

import torch

from engine.loader import load_model
from engine.runner import Engine
from retrieval.bench import EVERY_STEP, _probe_seed, _store
from retrieval.louiskv import LouisKV, LouisKVConfig
from retrieval.tasks import needle, passages

torch.set_num_threads(1)
eng = Engine(load_model())
tok = eng.tokenizer
texts = passages(limit=60)
probes = [tuple(map(float, p.split(":"))) for p in sys.argv[1].split(",")]  # depth:seed
variants = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}


def trace_run(out, probe, needle_pos, digit_pos, cfg, units_from=None):
    store = _store() if units_from is None else units_from.store
    r = LouisKV(eng, cfg, store)
    cache = r.offload(out.cache.clone(), units_from=units_from)
    rec = []

    def att(call):
        layer = call.kv
        before = r.stats.retrievals
        o = r.attention(call)
        ret = r.stats.retrievals > before
        pos = layer.working.positions  # [heads, rows]
        res = []
        for h in range(pos.shape[0]):
            s = set(pos[h].tolist()) | set(layer.local_positions.tolist()) | set(range(layer.sink_k.shape[2]))
            res.append((sum(p in s for p in needle_pos), sum(p in s for p in digit_pos)))
        rec.append((call.layer, ret, res))
        return o

    new, _ = eng.decode(out.logits[0, -1], cache, 16, attention=att, stop=set())
    L = eng.spec.num_layers
    steps = [rec[i : i + L] for i in range(0, len(rec), L)]
    return new, steps, r


for depth, seed in probes:
    p = needle(tok, texts, 4096, depth, seed=_probe_seed(depth, int(seed)))
    sent_len = len(p.ids)  # placeholder
    # find the needle sentence tokens
    name_sent = tok.decode(p.ids[p.planted_at : p.planted_at + 20])
    nlen = next(
        n
        for n in range(5, 30)
        if p.answer in tok.decode(p.ids[p.planted_at : p.planted_at + n])
        and tok.decode(p.ids[p.planted_at + n - 1 : p.planted_at + n]).strip() == "."
    )
    needle_pos = list(range(p.planted_at, p.planted_at + nlen))
    digit_pos = [q for q in needle_pos if tok.decode([p.ids[q]]).strip().isdigit()]
    print(
        f"# probe depth {depth} seed {seed} answer {p.answer} needle {tok.decode(p.ids[needle_pos[0] : needle_pos[-1] + 1])!r} at {needle_pos[0]} digits {[tok.decode([p.ids[q]]) for q in digit_pos]}",
        flush=True,
    )
    t0 = time.time()
    out = eng.forward(p.ids)
    full, _ = eng.decode(out.logits[0, -1], out.cache.clone(), 16, stop=set())
    print("full:", [tok.decode([t]) for t in full], flush=True)
    base = None
    runs = {"louiskv-512": {}, "every-step-512": {"tau": EVERY_STEP}} | variants
    results = {}
    for name, kw in runs.items():
        new, steps, r = trace_run(out, p, needle_pos, digit_pos, LouisKVConfig(budget=512, **kw), base)
        if base is None:
            base = r
        results[name] = (
            new,
            steps,
            dict(
                rate=round(r.stats.retrieval_rate, 3),
                after=round(r.stats.retrieval_rate_after_first, 3),
                step_rate=round(r.stats.step_retrieval_rate, 3),
            ),
        )
        if r is not base:
            r.release()
    ev = results["every-step-512"][1]
    for name, (new, steps, st) in results.items():
        toks = [tok.decode([t]) for t in new]
        print(f"{name}: correct={p.answer in tok.decode(new)} {st} text={tok.decode(new)!r}", flush=True)
        if name == "every-step-512":
            continue
        last = {}
        for s, rows in enumerate(steps):
            for l, ret, _res in rows:
                if ret:
                    last[l] = s
            nret = sum(x[1] for x in rows)
            crit = []
            for (l, ret, res), (_, _, eres) in zip(rows, ev[s], strict=False):
                d, ed = min(x[1] for x in res), min(x[1] for x in eres)
                if d < ed:
                    crit.append(f"L{l}{'R' if ret else '-'}{d}/{ed}@{last[l]}")
            print(
                f"  step {s:2d} {toks[s]!r:>8}->{(toks[s + 1] if s + 1 < len(toks) else ''):8} full={tok.decode([full[s + 1]]) if s + 1 < len(full) else '':6} retr {nret:2d}/30 fewer digits than every-step: {' '.join(crit)}",
                flush=True,
            )
    base.release()
    print(f"# probe took {time.time() - t0:.0f}s", flush=True)
