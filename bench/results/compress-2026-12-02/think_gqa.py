"""Why ThinK lambda = 0.4 misses top-1 0.95 here: the channel set is shared by a GQA group.

Same text, prompt and teacher forcing as `bench/compress.py` (MuSiQue item 0, 256 continuation tokens
fed 32 rows per forward over the compressed prompt), one JSON line per length on stdout:

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/results/compress-2026-12-02/think_gqa.py 1024 2048

Settings (all prune `int(64 * lam)` channels of the prompt keys older than the last 32):
- `shared_<lam>`: our ThinK (the spec): one channel set per KV head, scored with the group's 3 query heads.
- `perhead_<lam>`: one channel set per *query* head, as SalesforceAIResearch/ThinK's code does on a GQA
  model (it runs `repeat_kv` before pruning). Evaluated zero-filled (exact for its attention). Bytes
  two ways: `bytes_official` = what that code caches (keys and values repeated to 9 heads, the pruned
  keys narrow, a 1-byte mask entry per channel); `bytes_union` = the least a GQA cache can hold for it
  (each KV head keeps the union of its 3 query heads' channels; a head reads only its own).
- `*_oracle`: channels scored with the continuation's own 256 queries instead of the prompt's last 32
  (what no real prefill can see: an upper bound for the scoring rule).
Ratios are bytes / the full GQA cache's bytes (fp32, 3 KV heads x 64, 30 layers).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from compress.base import CompressedLayer, attend_parts, group_queries, scores, tail_mask  # noqa: E402
from compress.bench import dense_copy  # noqa: E402
from compress.evaluate import agreement, musique_text, teacher_force, tokens_of  # noqa: E402
from compress.runtime import compress_cache, kv_bytes, observe  # noqa: E402
from compress.think import ThinK  # noqa: E402
from engine.attention import AttnCall  # noqa: E402
from engine.kvcache import KVCache  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.paths import data_dir  # noqa: E402
from engine.runner import Engine  # noqa: E402

WINDOW = 32


@dataclass
class PerHeadLayer(CompressedLayer):
    """Old prompt keys zero-filled per query head `[b, kv, group, T_old, D]`; the rest full width."""

    method = "perhead"
    k_old: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.v.shape[-2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = torch.cat([self.k, k], -2), torch.cat([self.v, v], -2)
        return self.k, self.v

    def dense_nbytes(self) -> int:
        return 2 * self.v.nelement() * self.v.element_size()

    def attend(self, call: AttnCall) -> torch.Tensor:
        q = group_queries(call.q, self.k.shape[1])
        n = self.k_old.shape[-2]
        new = scores(q, self.k, call.scale)
        mask = tail_mask(call.q_index, n, self.k.shape[-2])
        new = new if mask is None else new + mask
        old = (q @ self.k_old.transpose(-1, -2)) * call.scale
        return attend_parts([old, new], [self.v[:, :, :n], self.v[:, :, n:]], call.q.dtype)


def perhead(cache: KVCache, queries: dict[int, torch.Tensor], lam: float) -> tuple[KVCache, int, int]:
    """Per-query-head ThinK of a plain cache, and its bytes (official layout, union layout)."""
    layers, official, union = [], 0, 0
    for i, lay in enumerate(cache.layers):
        k, v = lay.k, lay.v
        b, h, t, d = k.shape
        q = group_queries(queries[i], h).float()
        score = q.pow(2).sum(3) * k.float().pow(2).sum(2)[:, :, None]  # [b, kv, group, D]
        keep = torch.ones_like(score).scatter(-1, score.topk(int(d * lam), -1, largest=False).indices, 0)
        old = t - WINDOW
        layers.append(PerHeadLayer(k=k[:, :, old:], v=v, k_old=k[:, :, None, :old] * keep[:, :, :, None]))
        g, kept = q.shape[2], d - int(d * lam)
        official += 4 * h * g * (old * kept + WINDOW * d + t * d) + h * g * d
        union += 4 * (old * int(keep.amax(2).sum()) + h * (WINDOW * d + t * d)) + h * d
    return KVCache(layers, cache.positions.clone()), official, union


def run(engine: Engine, ids: list[int], n: int) -> dict:
    prompt, cont = ids[:n], ids[n : n + 257]
    out, seen = observe(engine, prompt)
    full_cache = dense_copy(out.cache)
    full_bytes = kv_bytes(full_cache)[0]
    full = teacher_force(engine, full_cache, cont, timed=1)
    _, seen_cont = observe(engine, prompt + cont[:-1], rows=256)  # the continuation's own queries
    rows: dict[str, dict] = {}

    def score(name: str, cache: KVCache, **extra: float) -> None:
        a = agreement(full, teacher_force(engine, cache, cont, timed=1))
        rows[name] = {"top1": round(a["top1"], 4), "kl": round(a["kl"], 4), **extra}
        print(f"  {n} {name}: {rows[name]}", file=sys.stderr, flush=True)

    for lam in (0.25, 0.4, 0.5):
        shared = compress_cache(engine, out.cache, ThinK(lam=lam), seen)
        score(f"shared_{lam}", shared, ratio=round(kv_bytes(shared)[0] / full_bytes, 4))
        cache, official, union = perhead(out.cache, {i: o.queries for i, o in seen.items()}, lam)
        score(f"perhead_{lam}", cache, ratio_official=round(official / full_bytes, 4),
              ratio_union=round(union / full_bytes, 4))  # fmt: skip
    shared = compress_cache(engine, out.cache, ThinK(lam=0.4), seen_cont)
    score("shared_0.4_oracle", shared, ratio=round(kv_bytes(shared)[0] / full_bytes, 4))
    cache, official, union = perhead(out.cache, {i: o.queries for i, o in seen_cont.items()}, 0.4)
    score("perhead_0.4_oracle", cache, ratio_union=round(union / full_bytes, 4))
    return {"length": n, "rows": rows}


def main() -> None:
    torch.set_num_threads(1)
    engine = Engine(load_model())
    ids = tokens_of(engine, musique_text(data_dir(), 0))
    for n in [int(a) for a in sys.argv[1:]] or [1024]:
        print(json.dumps(run(engine, ids, n)), flush=True)


if __name__ == "__main__":
    main()
