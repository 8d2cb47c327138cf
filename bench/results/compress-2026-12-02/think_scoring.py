"""ThinK lambda = 0.4 with other ways to pool the channel score over a GQA group (one JSON line per run).

Same text, prompt and teacher forcing as `bench/compress.py` (MuSiQue item 0, 256 tokens, 32 rows per
forward); each variant replaces `compress.think.channel_scores` (the bytes are those of ThinK 0.4):

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/results/compress-2026-12-02/think_scoring.py 1024 2048

- `current`: ThinK's score, `||Q_group[:, c]|| * ||K[:, c]||` with the group's 3 x 32 query rows stacked
  (= the sum over the group of squared per-head norms: kvpress's ranking);
- `sum_norms`: the group's per-head query norms summed; `max`: their maximum;
- `pooled_q`: the norm of the group's mean query; `normalized`: each head's query energy normalized to 1
  over its channels before summing;
- `keys_old`: key norms over the pruned tokens only (the last 32 excluded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from compress import think  # noqa: E402
from compress.base import group_queries  # noqa: E402
from compress.bench import dense_copy  # noqa: E402
from compress.evaluate import agreement, musique_text, teacher_force, tokens_of  # noqa: E402
from compress.runtime import compress_cache, kv_bytes, observe  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.paths import data_dir  # noqa: E402
from engine.runner import Engine  # noqa: E402

CURRENT = think.channel_scores


def _key_norms(k: torch.Tensor) -> torch.Tensor:
    return k.float().pow(2).sum(2).sqrt()


def _group(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return group_queries(q, k.shape[1]).float()


VARIANTS = {
    "current": CURRENT,
    "sum_norms": lambda q, k: _group(q, k).pow(2).sum(3).sqrt().sum(2) * _key_norms(k),
    "max": lambda q, k: _group(q, k).pow(2).sum(3).amax(2).sqrt() * _key_norms(k),
    "pooled_q": lambda q, k: _group(q, k).mean(2).pow(2).sum(2).sqrt() * _key_norms(k),
    "normalized": lambda q, k: (
        ((e := _group(q, k).pow(2).sum(3)) / e.sum(-1, keepdim=True)).sum(2).sqrt() * _key_norms(k)
    ),
    "keys_old": lambda q, k: CURRENT(q, k[:, :, :-32]),
}


def main() -> None:
    torch.set_num_threads(1)
    engine = Engine(load_model())
    ids = tokens_of(engine, musique_text(data_dir(), 0))
    for n in [int(a) for a in sys.argv[1:]] or [1024]:
        prompt, cont = ids[:n], ids[n : n + 257]
        out, seen = observe(engine, prompt)
        full_cache = dense_copy(out.cache)
        full_bytes = kv_bytes(full_cache)[0]
        full = teacher_force(engine, full_cache, cont, timed=1)
        rows = {}
        for name, fn in VARIANTS.items():
            think.channel_scores = fn
            cache = compress_cache(engine, out.cache, think.ThinK(lam=0.4), seen)
            ratio = kv_bytes(cache)[0] / full_bytes  # before teacher forcing appends the continuation
            a = agreement(full, teacher_force(engine, cache, cont, timed=1))
            rows[name] = {"top1": round(a["top1"], 4), "kl": round(a["kl"], 4), "ratio": round(ratio, 4)}
            print(f"  {n} {name}: {rows[name]}", file=sys.stderr, flush=True)
        think.channel_scores = CURRENT
        print(json.dumps({"length": n, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
