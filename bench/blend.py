"""Benchmark of fusing cached passages: TTFT and quality of full prefill, full reuse, CacheBlend, APE.

    .venv/bin/python bench/blend.py --quick                  # 3 NQ items (8 passages) + 1 MuSiQue item
    .venv/bin/python bench/blend.py --out bench/out/blend.jsonl --resume   # 200 NQ + 20 MuSiQue, resumable
    .venv/bin/python bench/blend.py --out X.jsonl --resume --ape-extra ape_t08:0.8:1.0   # add a method later
    .venv/bin/python bench/blend.py --out B.jsonl --merge A.jsonl --resume --reverse  # a 2nd process
    .venv/bin/python bench/blend.py --out A.jsonl --merge B.jsonl --report   # summarize, run nothing

Items: NQ-open oracle (a question's gold passage plus gold passages of other questions of a fixed pool as
distractors; the pool and each item's distractors and gold position are drawn with fixed seeds, so an
item is the same whatever --nq is; 15 passages is about 2K tokens) and MuSiQue (first 6 passages, about
3.6K tokens). Every method runs on the same items with the same real model (SmolLM2-135M-Instruct); each
passage's KV is computed once (behind the shared prefix) and stored in both tiers, for all methods and
all items that use it.

Quality: gold-answer F1 / exact match / answer hit (a gold answer appears in the output), each of the
first line of the output (`*_line`: the answer extraction of the NQ-open, CacheBlend and LongBench
evaluations, see `first_line`) and of the whole 32-token output, and fidelity to
full prefill (first-token top-1 agreement, KL(full || method) of the first token, token F1 and exact
match of the 32-token greedy output vs full prefill's). Speed: TTFT (loading + fusing, to the first
token's logits) with the passages' KV in the host tier, and (every --disk-every items) in the disk tier
with its files dropped from the page cache first.

Resumable: each item's results are appended to the --out JSONL as soon as it is done; with --resume, items
whose requested methods are all there are skipped, and lines of the same item merge (so methods can run
in separate passes). Full prefill's first-token logits and greedy tokens are kept per item (safetensors,
next to the JSONL) so a later pass can score a method against them without recomputing. The summary
(JSON, printed and written to the .json beside the JSONL) and the plot cover the items that have every
method, and say how many those are.
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
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blend.ape import APEConfig  # noqa: E402
from blend.cacheblend import BlendConfig  # noqa: E402
from blend.costmodel import CostModel, measure_bandwidth  # noqa: E402
from blend.fuse import Fuser  # noqa: E402
from blend.segments import encode_segment  # noqa: E402
from engine.chat import DEFAULT_SYSTEM, build_chat  # noqa: E402
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
DEFAULT_METHODS = list(METHODS)


def add_ape_method(spec: str) -> str:
    """Register an extra APE row from "name:T:S[:merge]" (e.g. ape_tuned:0.5:1.0:shifted)."""
    name, *rest = spec.split(":")
    if not name or name in METHODS or len(rest) not in (2, 3):
        raise SystemExit(f"--ape-extra must be a new name:T:S[:merge], got {spec!r}")
    METHODS[name] = ("ape", None, APEConfig(float(rest[0]), float(rest[1]), *rest[2:]))
    return name


# ---- data ----------------------------------------------------------------------------------------


def nq_items(n: int, k: int, pool: int = 200, seed: int = 0) -> list[dict]:
    """The first n questions of a seeded order; distractors are gold passages of the first `pool`
    questions (a shared corpus, as in RAG: one passage's KV serves every item that retrieves it)."""
    with gzip.open(data_dir() / "rag" / "nq-open-oracle.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    corpus = order[: max(pool, k, n)]
    items = []
    for i in order[:n]:
        rng = random.Random(f"{seed}:{i}")  # per item: the same item whatever n is
        ctxs = [rows[j]["ctxs"][0] for j in rng.sample([j for j in corpus if j != i], k - 1)]
        ctxs.insert(rng.randrange(k), rows[i]["ctxs"][0])
        items.append(
            {
                "key": f"nq-{i}",
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
            "key": f"musique-{i}",
            "dataset": "musique",
            "question": r["question"],
            "answers": r["answers"],
            "passages": [f"{c['title']}\n{c['text']}" for c in r["ctxs"][:k]],
        }
        for i, r in enumerate(rows[:n])
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


def first_line(text: str) -> str:
    """The answer as the standard evaluations of generated answers read it: the text up to the first
    newline (Lost in the Middle's evaluate_qa_responses.py, whose nq-open-oracle file this bench uses;
    CacheBlend's parse_generation; LongBench's eval.py for triviaqa, its open-domain QA)."""
    return text.lstrip("\n").split("\n")[0].strip()


def gold_scores(text: str, answers: list[str]) -> dict[str, float]:
    """SQuAD-normalized token F1 / exact match / answer contained ("hit": Lost in the Middle's
    best_subspan_em) against the best gold answer, of the whole output and (`*_line`) of its first line."""
    out = {}
    for suffix, part in (("", text), ("_line", first_line(text))):
        pred = normalize(part)
        out[f"gold_f1{suffix}"] = max(f1(pred.split(), normalize(a).split()) for a in answers)
        out[f"gold_em{suffix}"] = float(any(pred == normalize(a) for a in answers))
        out[f"gold_hit{suffix}"] = float(any(normalize(a) and normalize(a) in pred for a in answers))
    return out


def gold_answers(keys: list[str]) -> dict[str, list[str]]:
    """Gold answers of bench item keys ("nq-<row>", "musique-<row>"), read from the data files."""
    out: dict[str, list[str]] = {}
    if any(k.startswith("nq-") for k in keys):
        with gzip.open(data_dir() / "rag" / "nq-open-oracle.jsonl.gz", "rt") as f:
            nq = [json.loads(line)["answers"] for line in f]
    if any(k.startswith("musique-") for k in keys):
        mu = [r["answers"] for r in json.loads((data_dir() / "rag" / "musique_s.json").read_text())]
    for key in keys:
        dataset, _, row = key.rpartition("-")
        if dataset not in ("nq", "musique") or not row.isdigit():
            raise ValueError(f"not a bench item key: {key!r}")
        out[key] = (nq if dataset == "nq" else mu)[int(row)]
    return out


def rescore(results: list[dict]) -> None:
    """Recompute every row's gold scores from its stored text, so lines written by an older scorer
    (no first-line columns) are summarized with the current one."""
    answers = gold_answers([r["key"] for r in results])
    for r in results:
        for row in r["methods"].values():
            row.update(gold_scores(row["text"], answers[r["key"]]))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def fidelity(
    ref_logits: torch.Tensor, ref_tokens: list[int], logits: torch.Tensor, tokens: list[int]
) -> dict:
    return {
        "top1": float(int(logits.argmax()) == int(ref_logits.argmax())),
        "kl": kl(ref_logits, logits),
        "out_f1": f1([str(t) for t in tokens], [str(t) for t in ref_tokens]),
        "out_em": float(tokens == ref_tokens),
    }


# ---- results on disk -----------------------------------------------------------------------------


def load_results(paths: list[Path]) -> dict[str, dict]:
    """Item key -> merged record (methods of every line of that item)."""
    merged: dict[str, dict] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            have = merged.setdefault(rec["key"], {**rec, "methods": {}})
            have["methods"].update(rec["methods"])
    return merged


def pending(key: str, methods: list[str], paths: list[Path]) -> list[str]:
    """The methods no line of these files holds for the item yet. Read afresh before every item, so two
    processes on one item list (one --reverse, each with the other's --out in --merge) stop where they
    meet instead of running each other's items again."""
    for attempt in range(5):
        try:
            have = load_results(paths).get(key, {}).get("methods", {})
            break
        except json.JSONDecodeError:  # the other process is appending a line right now
            if attempt == 4:
                raise
            time.sleep(1)
    return [m for m in methods if m not in have]


def ref_path(out: Path, key: str) -> Path:
    return out.with_suffix("").parent / f"{out.with_suffix('').name}_ref" / f"{key}.safetensors"


def save_ref(path: Path, logits: torch.Tensor, tokens: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits.float().contiguous(), "tokens": torch.tensor(tokens, dtype=torch.long)}, path)


def load_ref(path: Path) -> tuple[torch.Tensor, list[int]]:
    t = load_file(path)
    return t["logits"], t["tokens"].tolist()


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


def put_passages(engine, fusers, prompt) -> int:
    """Encode each passage the stores lack once behind the prefix and store it in both tiers."""
    host = fusers["host"]
    prefix = host.prefix_cache(prompt.prefix, len(prompt.prefix))
    computed = 0
    for ids in prompt.passages:
        if all(f.connector.has_segment(ids) for f in fusers.values()):
            continue
        kv, positions = encode_segment(engine, prefix, ids)
        for f in fusers.values():
            f.connector.put_segment(ids, kv, positions)
        computed += 1
    for f in fusers.values():
        f.prefix_cache(prompt.prefix, len(prompt.prefix))
        f.connector.kvstore.flush()
    return computed


def run_item(engine, tok, fusers, disk_dir, item, args, methods, with_disk: bool) -> dict:
    prompt = build_chat(tok, item["question"], item["passages"], system=args.system)
    t0 = time.perf_counter()
    computed = put_passages(engine, fusers, prompt)
    stop = engine.stop_ids()
    out = {
        "key": item["key"],
        "dataset": item["dataset"],
        "tokens": len(prompt.ids),
        "encoded_passages": computed,
        "encode_s": round(time.perf_counter() - t0, 3),
        "methods": {},
    }
    ref = ref_path(Path(args.out), item["key"])
    found = [r for r in (ref_path(Path(o), item["key"]) for o in [args.out, *args.merge]) if r.exists()]
    ref_logits, ref_tokens = load_ref(found[0]) if found else (None, None)
    for name in methods:
        method, bcfg, acfg = METHODS[name]
        fused = fusers["host"].fuse(prompt, method, bcfg, acfg)
        tokens, _ = engine.decode(fused.logits, fused.cache, args.new_tokens, fused.decode_attention)
        text = tok.decode([t for t in tokens if t not in stop]).strip()
        row = {"ttft_host_s": fused.ttft_s, "text": text, **gold_scores(text, item["answers"])}
        if fused.stats is not None:
            row["recompute_fraction"] = fused.stats.recompute_fraction()
        if name == "full_prefill":
            ref_logits, ref_tokens = fused.logits, tokens
            save_ref(ref, fused.logits, tokens)
        else:
            if ref_logits is not None:  # None only with --no-reference
                row.update(fidelity(ref_logits, ref_tokens, fused.logits, tokens))
            if with_disk:
                drop_page_cache(disk_dir)
                row["ttft_disk_s"] = fusers["disk"].fuse(prompt, method, bcfg, acfg).ttft_s
        out["methods"][name] = row
    return out


def summarize(results: list[dict], methods: list[str]) -> dict:
    summary = {}
    for name in methods:
        rows = [r["methods"][name] for r in results]
        keys = [k for k in rows[0] if k not in ("text", "ttft_disk_s")]
        s = {key: statistics.mean(row[key] for row in rows) for key in keys}
        disk = [row["ttft_disk_s"] for row in rows if "ttft_disk_s" in row]
        if disk:
            s["ttft_disk_s"] = statistics.mean(disk)
            s["disk_items"] = len(disk)
        summary[name] = {k: round(v, 4) for k, v in s.items()}
    for name in methods:
        s = summary[name]
        # per-item ratios, measured back to back on the same item: robust to the shared cores' load swings
        s["speedup_host_median"] = _median(_ratios(results, name, "ttft_host_s"))
        long = [r for r in results if r["tokens"] >= 2000]
        s["speedup_host_median_ge2k"] = _median(_ratios(long, name, "ttft_host_s"))
        s["items_ge2k"] = len(long)
        if "ttft_disk_s" in s:
            s["speedup_disk_median"] = _median(_ratios(results, name, "ttft_disk_s"))
        for key in PAIRED:
            s.update(paired(results, name, key))
    return summary


# gold measures compared item by item with full prefill: whole output (as before) and first line
PAIRED = ("gold_f1", "gold_f1_line", "gold_hit_line")


def paired(results: list[dict], name: str, key: str) -> dict[str, float | None]:
    """The method's gap to full prefill on the same items and its standard error, and its ratio to full
    prefill's mean with a delta-method standard error (the items' paired covariance included)."""
    a = [r["methods"][name][key] for r in results]
    b = [r["methods"]["full_prefill"][key] for r in results]
    n, diffs = len(a), [x - y for x, y in zip(a, b, strict=True)]
    out: dict[str, float | None] = {f"{key}_minus_full": round(statistics.mean(diffs), 4)}
    out[f"{key}_minus_full_se"] = round(statistics.stdev(diffs) / n**0.5, 4) if n > 1 else None
    mb = statistics.mean(b)
    ratio = statistics.mean(a) / mb if mb else None
    out[f"{key}_ratio"] = round(ratio, 3) if ratio is not None else None
    if ratio is not None and n > 1:
        var = (
            statistics.variance(a)
            + ratio**2 * statistics.variance(b)
            - 2 * ratio * statistics.covariance(a, b)
        )
        out[f"{key}_ratio_se"] = round(max(var, 0.0) ** 0.5 / (mb * n**0.5), 3)
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _ratios(results: list[dict], name: str, key: str) -> list[float]:
    full = "full_prefill"
    return [
        r["methods"][full]["ttft_host_s"] / r["methods"][name][key]
        for r in results
        if key in r["methods"][name]
    ]


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
    b.bar(
        [i - 0.3 for i in x], [summary[n]["gold_f1_line"] for n in names], 0.2, label="gold F1 (first line)"
    )
    b.bar(
        [i - 0.1 for i in x],
        [summary[n]["gold_hit_line"] for n in names],
        0.2,
        label="gold answer in first line",
    )
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
        if not keys:
            continue
        if tier == "disk":
            drop_page_cache(Path(f.connector.kvstore.config.disk_path))
        bw = measure_bandwidth(f.connector.kvstore, keys[:20])
        model = CostModel(per, bw, spec.kv_bytes_per_token // spec.num_layers)
        out[tier] = {"bandwidth_gbs": bw / 1e9, "r_load": model.load_ratio(), "r_for_0.15": model.ratio(0.15)}
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nq", type=int, default=200, help="NQ items")
    ap.add_argument("--nq-passages", type=int, default=15, help="passages per NQ item (15: about 2K tokens)")
    ap.add_argument("--nq-pool", type=int, default=200, help="questions whose gold passages form the corpus")
    ap.add_argument("--musique", type=int, default=20, help="MuSiQue items")
    ap.add_argument("--musique-passages", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset")
    ap.add_argument("--ape-extra", action="append", default=[], help="extra APE row name:T:S[:merge]")
    ap.add_argument("--disk-every", type=int, default=4, help="measure disk-tier TTFT on every n-th item")
    ap.add_argument(
        "--order",
        choices=("interleave", "nq-first"),
        default="interleave",
        help="interleave: one MuSiQue item after every 10 NQ items (a partial run has both)",
    )
    ap.add_argument(
        "--reverse",
        action="store_true",
        help="run the items from the last one back (a second process on another --out)",
    )
    ap.add_argument(
        "--skip", type=int, default=0, help="leave out the first n items to run (a third process)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on shared cores)")
    ap.add_argument("--quick", action="store_true", help="3 NQ items of 8 passages + 1 MuSiQue item")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "blend.jsonl"), help="per-item JSONL")
    ap.add_argument(
        "--merge",
        action="append",
        default=[],
        help="more JSONL files (other processes' --out): summarized with --out, and their items skipped",
    )
    ap.add_argument("--resume", action="store_true", help="skip items whose methods --out already holds")
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="with --resume: do not re-run full prefill for items whose reference logits were not kept; "
        "the new methods get gold scores (paired with the stored full prefill output) but no fidelity",
    )
    ap.add_argument("--report", action="store_true", help="only summarize --out (and --merge) and plot")
    ap.add_argument("--table-methods", default=None, help="methods of the summary (default: --methods)")
    ap.add_argument("--plot", default=str(REPO / "bench" / "out" / "blend.png"))
    ap.add_argument("--note", default="", help="what the machine was doing (goes into the JSON)")
    ap.add_argument(
        "--system",
        default=DEFAULT_SYSTEM,
        help="the system turn (the shared prefix every passage is encoded behind); the default asks for "
        "brevity, CacheBlend's and LongBench's evaluation prompts ask for the bare answer",
    )
    args = ap.parse_args()
    if args.quick:
        args.nq, args.nq_passages, args.musique = 3, 8, 1
    extra = [add_ape_method(spec) for spec in args.ape_extra]
    args.methods = [m for m in args.methods.split(",") if m] + [m for m in extra if m not in args.methods]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods must be among {list(METHODS)}; unknown: {sorted(unknown)}")
    args.table_methods = args.table_methods.split(",") if args.table_methods else args.methods
    return args


def ordered_items(args) -> list[dict]:
    nq = nq_items(args.nq, args.nq_passages, args.nq_pool)
    mu = musique_items(args.musique, args.musique_passages)
    if args.order == "nq-first":
        return nq + mu
    items = []
    for i, item in enumerate(nq):
        items.append(item)
        if (i + 1) % 10 == 0 and mu:
            items.append(mu.pop(0))
    return items + mu


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.report:
        report(args, {"note": "not measured (--report)"}, 0.0)
        return
    torch.set_num_threads(args.threads)
    loaded = load_model()
    engine = Engine(loaded)
    tok = loaded.tokenizer
    done = load_results([out, *map(Path, args.merge)]) if args.resume else {}
    if not args.resume and out.exists():
        raise SystemExit(f"{out} exists: pass --resume to continue it, or another --out")
    items = ordered_items(args)
    todo = [it for it in items if not set(args.methods) <= set(done.get(it["key"], {}).get("methods", {}))]
    print(f"{len(items) - len(todo)} of {len(items)} items already done", file=sys.stderr)
    todo = (todo[::-1] if args.reverse else todo)[args.skip :]
    print(f"{len(todo)} to run (reverse={args.reverse}, skip={args.skip})", file=sys.stderr)
    namespace = Namespace(loaded.model_id, KVLayout.for_spec(loaded.spec), salt="bench-blend")
    with tempfile.TemporaryDirectory(prefix="kvfuse-blend-") as tmp:
        disk_dir = Path(tmp) / "disk"
        stores = {
            "host": TieredStore(StoreConfig(host_bytes=6 << 30)),  # LRU: shared NQ passages stay
            "disk": TieredStore(StoreConfig(host_bytes=0, disk_path=str(disk_dir), disk_bytes=64 << 30)),
        }
        fusers = {t: Fuser(engine, KVConnector(s, namespace)) for t, s in stores.items()}
        warm = build_chat(tok, "warm up?", ["A short passage to warm up the kernels."], system=args.system)
        for m in ("full_prefill", "cacheblend", "ape"):
            fusers["host"].fuse(warm, m)
        t_start, tokens = time.perf_counter(), 0
        for n, item in enumerate(todo):
            methods = (
                pending(item["key"], args.methods, [out, *map(Path, args.merge)])
                if args.resume
                else list(args.methods)
            )
            if not methods:  # another process (its --out among --merge) did this item meanwhile
                print(
                    f"[{n + 1}/{len(todo)}] {item['key']} done elsewhere, skipped",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            refs = [ref_path(Path(o), item["key"]) for o in [args.out, *args.merge]]
            if "full_prefill" not in methods and not any(r.exists() for r in refs) and not args.no_reference:
                # the reference every other method is scored against (its logits were not kept)
                methods.insert(0, "full_prefill")
            with_disk = items.index(item) % args.disk_every == 0
            rec = run_item(engine, tok, fusers, disk_dir, item, args, methods, with_disk)
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            tokens = rec["tokens"]
            elapsed = time.perf_counter() - t_start
            print(
                f"[{n + 1}/{len(todo)}] {rec['key']} {rec['tokens']} tok enc {rec['encode_s']:.1f}s "
                + " ".join(f"{m}={v['ttft_host_s']:.2f}s" for m, v in rec["methods"].items())
                + f" | {elapsed / (n + 1):.0f} s/item, ETA {elapsed / (n + 1) * (len(todo) - n - 1) / 60:.0f} min",
                file=sys.stderr,
                flush=True,
            )
        costs = cost_model(engine, fusers, tokens or 1024)
        for s in stores.values():
            s.close()
    report(args, costs, time.perf_counter() - t_start, loaded.model_id)


def report(args, costs: dict, seconds: float, model: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> None:
    out = Path(args.out)
    merged = load_results([out, *map(Path, args.merge)])
    methods = args.table_methods
    complete = [r for r in merged.values() if set(methods) <= set(r["methods"])]
    if not complete:
        raise SystemExit(f"no item in {out} has all of {methods}")
    rescore(complete)
    by_dataset = {
        d: summarize([r for r in complete if r["dataset"] == d], methods)
        for d in sorted({r["dataset"] for r in complete})
    }
    result = {
        "bench": "blend",
        "model": model,
        "threads": args.threads,
        "note": args.note,
        "system": args.system,
        "items": {d: sum(r["dataset"] == d for r in complete) for d in by_dataset},
        "items_requested": {"nq": args.nq, "musique": args.musique},
        "items_with_any_result": len(merged),
        "nq_passages": args.nq_passages,
        "musique_passages": args.musique_passages,
        "mean_tokens": {
            d: round(statistics.mean(r["tokens"] for r in complete if r["dataset"] == d)) for d in by_dataset
        },
        "new_tokens": args.new_tokens,
        "seconds": round(seconds, 1),
        "cost_model": costs,
        "summary": by_dataset,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    shown = "nq" if "nq" in by_dataset else next(iter(by_dataset))
    title = f"{shown}: {result['items'][shown]} items, ~{result['mean_tokens'][shown]} tokens, {args.threads} thread"
    plot(by_dataset[shown], Path(args.plot), f"SmolLM2-135M-Instruct on CPU ({title})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
