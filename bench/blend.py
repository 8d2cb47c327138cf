"""Benchmark of fusing cached passages: TTFT and quality of full prefill, full reuse, CacheBlend, APE.

    .venv/bin/python bench/blend.py --quick                 # 3 NQ items (8 passages) + 1 MuSiQue item
    .venv/bin/python bench/blend.py --nq 30 --musique 3     # what the README reports
    .venv/bin/python bench/blend.py                         # the full size: 200 NQ + 20 MuSiQue items

Items: NQ-open oracle (the gold passage plus gold passages of other questions as distractors, gold
position drawn with a fixed seed; 15 passages is about 2K tokens) and MuSiQue (first 6 passages, about
3K tokens). Every method runs on the same items with the same real model (SmolLM2-135M-Instruct).
Quality: gold-answer F1 / exact match / answer hit (a gold answer appears in the output) and fidelity to
full prefill (first-token top-1 agreement, KL(full || method) of the first token, token F1 and exact
match of the 32-token greedy output vs full prefill's). Speed: TTFT (loading + fusing, to the first
token's logits) with the passages' KV in the host tier, and in the disk tier with its files dropped from
the page cache first. Prints one JSON line; writes bench/out/blend.json and bench/out/blend.png.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import re
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blend.ape import APEConfig  # noqa: E402
from blend.cacheblend import BlendConfig  # noqa: E402
from blend.costmodel import CostModel, measure_bandwidth  # noqa: E402
from blend.fuse import Fuser  # noqa: E402
from blend.segments import encode_segment  # noqa: E402
from engine.chat import build_chat  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.paths import data_dir  # noqa: E402
from engine.runner import Engine  # noqa: E402
from kvstore import KVConnector, KVLayout, Namespace, StoreConfig, TieredStore  # noqa: E402

# name -> (fuser method, blend config, ape config)
METHODS = {
    "full_prefill": ("full_prefill", None, None),
    "full_reuse": ("full_reuse", None, None),
    "cacheblend_0.05": ("cacheblend", BlendConfig(ratio=0.05), None),
    "cacheblend_0.15": ("cacheblend", BlendConfig(ratio=0.15), None),
    "cacheblend_0.30": ("cacheblend", BlendConfig(ratio=0.30), None),
    "ape": ("ape", None, APEConfig(0.9, 0.9)),
    "parallel": ("parallel", None, None),
}


# ---- data ----------------------------------------------------------------------------------------


def nq_items(n: int, k: int, seed: int = 0) -> list[dict]:
    with gzip.open(data_dir() / "rag" / "nq-open-oracle.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), len(rows))
    items = []
    for i in order[:n]:
        gold = rows[i]["ctxs"][0]
        others = [rows[j]["ctxs"][0] for j in rng.sample(range(len(rows)), k + 5) if j != i][: k - 1]
        ctxs = others[:]
        ctxs.insert(rng.randrange(k), gold)
        items.append(
            {
                "dataset": "nq",
                "question": rows[i]["question"],
                "answers": rows[i]["answers"],
                "passages": [f"{c['title']}\n{c['text']}" for c in ctxs],
            }
        )
    return items


def musique_items(n: int, k: int) -> list[dict]:
    rows = json.loads((data_dir() / "rag" / "musique_s.json").read_text())
    return [
        {
            "dataset": "musique",
            "question": r["question"],
            "answers": r["answers"],
            "passages": [f"{c['title']}\n{c['text']}" for c in r["ctxs"][:k]],
        }
        for r in rows[:n]
    ]


# ---- metrics -------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(pred: list[str], gold: list[str]) -> float:
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def gold_scores(text: str, answers: list[str]) -> dict[str, float]:
    pred = normalize(text)
    return {
        "gold_f1": max(f1(pred.split(), normalize(a).split()) for a in answers),
        "gold_em": float(any(pred == normalize(a) for a in answers)),
        "gold_hit": float(any(normalize(a) and normalize(a) in pred for a in answers)),
    }


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


# ---- running -------------------------------------------------------------------------------------


def drop_page_cache(folder: Path) -> None:
    """Make disk reads real: ask the kernel to forget the tier's files (no root needed)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def put_passages(engine, fusers, prompt) -> None:
    """Encode each passage once behind the prefix and store it in every store (host and disk)."""
    host = fusers["host"]
    prefix = host.prefix_cache(prompt.prefix, len(prompt.prefix))
    for ids in prompt.passages:
        if host.connector.has_segment(ids):
            continue
        kv, positions = encode_segment(engine, prefix, ids)
        for f in fusers.values():
            f.connector.put_segment(ids, kv, positions)
    for f in fusers.values():
        f.prefix_cache(prompt.prefix, len(prompt.prefix))
        f.connector.kvstore.flush()


def run_item(engine, tok, fusers, disk_dir, item, new_tokens, methods) -> dict:
    prompt = build_chat(tok, item["question"], item["passages"])
    put_passages(engine, fusers, prompt)
    stop = engine.stop_ids()
    out = {"dataset": item["dataset"], "tokens": len(prompt.ids), "methods": {}}
    ref_logits, ref_tokens = None, []
    for name in methods:
        method, bcfg, acfg = METHODS[name]
        fused = fusers["host"].fuse(prompt, method, bcfg, acfg)
        tokens, _ = engine.decode(fused.logits, fused.cache, new_tokens)
        text = tok.decode([t for t in tokens if t not in stop]).strip()
        row = {"ttft_host_s": fused.ttft_s, "text": text, **gold_scores(text, item["answers"])}
        if fused.stats is not None:
            row["recompute_fraction"] = fused.stats.recompute_fraction()
        if name == "full_prefill":
            ref_logits, ref_tokens = fused.logits, tokens
        else:
            row["top1"] = float(int(fused.logits.argmax()) == int(ref_logits.argmax()))
            row["kl"] = kl(ref_logits, fused.logits)
            row["out_f1"] = f1([str(t) for t in tokens], [str(t) for t in ref_tokens])
            row["out_em"] = float(tokens == ref_tokens)
            drop_page_cache(disk_dir)
            row["ttft_disk_s"] = fusers["disk"].fuse(prompt, method, bcfg, acfg).ttft_s
        out["methods"][name] = row
    return out


def summarize(results: list[dict], methods: list[str]) -> dict:
    summary = {}
    for name in methods:
        rows = [r["methods"][name] for r in results]
        s = {key: statistics.mean(row[key] for row in rows) for key in rows[0] if key != "text"}
        summary[name] = {k: round(v, 4) for k, v in s.items()}
    full = summary["full_prefill"]["ttft_host_s"]
    for name in methods:
        s = summary[name]
        s["speedup_host"] = round(full / s["ttft_host_s"], 2)
        # per-item ratios, measured back to back on the same item: robust to the shared cores' load swings
        s["speedup_host_median"] = round(statistics.median(_ratios(results, name, "ttft_host_s")), 2)
        if "ttft_disk_s" in s:
            s["speedup_disk"] = round(full / s["ttft_disk_s"], 2)
            s["speedup_disk_median"] = round(statistics.median(_ratios(results, name, "ttft_disk_s")), 2)
    return summary


def _ratios(results: list[dict], name: str, key: str) -> list[float]:
    return [r["methods"]["full_prefill"]["ttft_host_s"] / r["methods"][name][key] for r in results]


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = range(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    a.bar([i - 0.2 for i in x], [summary[n]["ttft_host_s"] for n in names], 0.4, label="KV in host tier")
    a.bar(
        [i + 0.2 for i in x],
        [summary[n].get("ttft_disk_s", summary[n]["ttft_host_s"]) for n in names],
        0.4,
        label="KV in disk tier (page cache dropped)",
    )
    a.set_ylabel("TTFT (s)")
    a.set_title("time to first token")
    b.bar([i - 0.3 for i in x], [summary[n]["gold_f1"] for n in names], 0.2, label="gold F1")
    b.bar([i - 0.1 for i in x], [summary[n]["gold_hit"] for n in names], 0.2, label="gold answer in output")
    b.bar([i + 0.1 for i in x], [summary[n].get("out_f1", 1.0) for n in names], 0.2, label="token F1 vs full")
    b.bar([i + 0.3 for i in x], [summary[n].get("top1", 1.0) for n in names], 0.2, label="top-1 agreement")
    b.set_title("quality")
    for ax in (a, b):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cost_model(engine, fusers, item_tokens: int) -> dict:
    """The spec's cost model: measured tier bandwidths and prefill speed, and the r they imply."""
    spec = engine.spec
    ids = list(range(1000, 1000 + min(item_tokens, 1024)))
    t0 = time.perf_counter()
    engine.forward(ids, logits="none")
    per = (time.perf_counter() - t0) / (len(ids) * spec.num_layers)
    out = {"prefill_s_per_token_layer": per}
    for tier, f in fusers.items():
        store = f.connector.kvstore
        keys = [k for k in list(store.keys()) if store.get(k, copy=False).num_tokens > 16]
        if tier == "disk":
            drop_page_cache(Path(f.connector.kvstore.config.disk_path))
        bw = measure_bandwidth(f.connector.kvstore, keys[:20])
        model = CostModel(per, bw, spec.kv_bytes_per_token // spec.num_layers)
        out[tier] = {"bandwidth_gbs": bw / 1e9, "r_load": model.load_ratio(), "r_for_0.15": model.ratio(0.15)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nq", type=int, default=200, help="NQ items")
    ap.add_argument("--nq-passages", type=int, default=15, help="passages per NQ item (15: about 2K tokens)")
    ap.add_argument("--musique", type=int, default=20, help="MuSiQue items")
    ap.add_argument("--musique-passages", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on shared cores)")
    ap.add_argument("--quick", action="store_true", help="3 NQ items of 8 passages + 1 MuSiQue item")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "blend.json"))
    ap.add_argument("--plot", default=str(REPO / "bench" / "out" / "blend.png"))
    ap.add_argument("--report-from", default=None, help="summarize a saved *.partial.json instead of running")
    args = ap.parse_args()
    if args.report_from:
        results = json.loads(Path(args.report_from).read_text())
        methods = list(results[0]["methods"])
        report(args, results, methods, {"note": "not measured (report from partial results)"}, 0.0, "?")
        return
    if args.quick:
        args.nq, args.nq_passages, args.musique = 3, 8, 1
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown or methods[0] != "full_prefill":
        raise SystemExit(
            f"--methods must start with full_prefill and be among {list(METHODS)}; bad: {unknown}"
        )
    torch.set_num_threads(args.threads)
    loaded = load_model()
    engine = Engine(loaded)
    tok = loaded.tokenizer
    items = nq_items(args.nq, args.nq_passages) + musique_items(args.musique, args.musique_passages)
    namespace = Namespace(loaded.model_id, KVLayout.for_spec(loaded.spec), salt="bench-blend")
    with tempfile.TemporaryDirectory(prefix="kvfuse-blend-") as tmp:
        disk_dir = Path(tmp) / "disk"
        stores = {
            "host": TieredStore(StoreConfig(host_bytes=16 << 30)),
            "disk": TieredStore(StoreConfig(host_bytes=0, disk_path=str(disk_dir), disk_bytes=64 << 30)),
        }
        fusers = {t: Fuser(engine, KVConnector(s, namespace)) for t, s in stores.items()}
        warm = build_chat(tok, "warm up?", ["A short passage to warm up the kernels."])
        for m in ("full_prefill", "cacheblend", "ape"):
            fusers["host"].fuse(warm, m)
        results, t_start = [], time.perf_counter()
        for i, item in enumerate(items):
            results.append(run_item(engine, tok, fusers, disk_dir, item, args.new_tokens, methods))
            r = results[-1]
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results))  # survives a kill
            print(
                f"[{i + 1}/{len(items)}] {r['dataset']} {r['tokens']} tok "
                + " ".join(f"{m}={v['ttft_host_s']:.2f}s" for m, v in r["methods"].items()),
                file=sys.stderr,
                flush=True,
            )
        costs = cost_model(engine, fusers, results[0]["tokens"])
        for s in stores.values():
            s.close()
    report(args, results, methods, costs, time.perf_counter() - t_start, loaded.model_id)


def report(args, results: list[dict], methods: list[str], costs: dict, seconds: float, model: str) -> None:
    by_dataset = {
        d: summarize([r for r in results if r["dataset"] == d], methods)
        for d in sorted({r["dataset"] for r in results})
    }
    out = {
        "bench": "blend",
        "model": model,
        "threads": args.threads,
        "items": {d: sum(r["dataset"] == d for r in results) for d in by_dataset},
        "nq_passages": args.nq_passages,
        "musique_passages": args.musique_passages,
        "mean_tokens": {
            d: round(statistics.mean(r["tokens"] for r in results if r["dataset"] == d)) for d in by_dataset
        },
        "new_tokens": args.new_tokens,
        "seconds": round(seconds, 1),
        "cost_model": costs,
        "summary": by_dataset,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**out, "results": results}, indent=1))
    shown = "nq" if "nq" in by_dataset else next(iter(by_dataset))
    title = (
        f"{shown}: {out['items'][shown]} items, ~{out['mean_tokens'][shown]} tokens, {args.threads} thread(s)"
    )
    plot(by_dataset[shown], Path(args.plot), f"SmolLM2-135M-Instruct on CPU ({title})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
