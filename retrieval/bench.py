"""The retrieval benchmark (`kvfuse retrieval bench`, `bench/retrieval.py`): one JSON line and a plot.

Everything is measured side by side in one run against the same model with its full cache:
- passkey and needle (in MuSiQue passages) accuracy per input length and LouisKV budget, plus LouisKV
  retrieving at every step and with the short-answer taus of either trigger (`ANSWER_TAU` adjacent,
  `ANCHOR_TAU` anchor), the step-level trigger (`STEP_TAU`) and a periodic baseline at the middle
  budget, each with and without `follow` (`methods` picks a subset); every method decodes from the same
  full prefill of a probe, and the LouisKV variants read the prompt units the first one put in the store
  (identical: the clustering depends on neither budget nor tau). With
  `results`, each probe's rows are appended to a JSONL file as soon as it is done, probes already there
  are skipped (a run resumes), and `stop_at` (a unix time) stops starting new probes;
- long-output agreement: greedy match length of LouisKV (default tau, and every step, plus the variants
  `methods` names) vs the full cache;
- ReKV: block recall@k (per layer, averaged) and answer accuracy for facts planted at known blocks;
- per configuration: retrievals per (layer, token), bytes fetched from the store, decode ms per token.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.chat import build_chat
from engine.runner import Engine
from kvstore.config import StoreConfig
from kvstore.store import TieredStore
from retrieval.louiskv import (
    ANCHOR_TAU,
    ANSWER_TAU,
    STEP_LAYERS,
    STEP_TAU,
    STEP_TRIGGER,
    LouisKV,
    LouisKVConfig,
)
from retrieval.rekv import ReKV, ReKVConfig
from retrieval.tasks import FACTS, fact_stream, needle, passages, passkey

EVERY_STEP = 2.0  # a tau above 1: retrieve at every step
FOLLOW = 4  # LouisKVConfig.follow of the "follow" variants
PARTS = ("accuracy", "long_output", "rekv")
TASKS = ("passkey", "needle")


@dataclass
class BenchConfig:
    lengths: tuple[int, ...] = (2048, 4096)
    budgets: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seeds: tuple[int, ...] = (0,)  # probe draws per (task, length, depth); seed 0 = the earlier runs' probes
    answer_tokens: int = 16  # SmolLM2 spells numbers digit by digit: 'The pass key is 4 8 2 1 3.'
    long_prompt_tokens: int = 1024
    long_output_tokens: int = 256
    long_budget: int = 512
    stream_tokens: tuple[int, ...] = (4096, 8000)
    stream_facts: int = 6  # per 4K tokens (at most 8)
    rekv: ReKVConfig = field(default_factory=ReKVConfig)
    threads: int = 1
    parts: tuple[str, ...] = PARTS  # which measurements to run (the plot needs all of them)
    results: str | None = None  # JSONL file of per-probe accuracy rows (appended; resumes)
    stop_at: float | None = None  # unix time after which no new accuracy probe is started
    methods: tuple[str, ...] | None = None  # accuracy variants to run (names of `_variants`); None: all
    tasks: tuple[str, ...] = TASKS  # accuracy probes to run

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"BenchConfig.parts must be a non-empty subset of {PARTS}, got {self.parts!r}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"BenchConfig.tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if self.methods is not None:
            names = [name for name, _ in _variants(self, every=True)]
            bad = [m for m in self.methods if m not in names]
            if bad or not self.methods:
                raise ValueError(f"BenchConfig.methods must be a non-empty subset of {names}, got {bad}")

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            lengths=(1024,),
            budgets=(128, 256),
            depths=(0.5,),
            long_prompt_tokens=512,
            long_output_tokens=32,
            long_budget=256,
            stream_tokens=(1024,),
            stream_facts=3,
            rekv=ReKVConfig(block_tokens=32, n_local=128, top_k=4),
        )


def _store() -> TieredStore:
    return TieredStore(StoreConfig(host_bytes=8 << 30, write_behind=False))


def _decode(engine: Engine, logits, cache, n: int, attention=None) -> tuple[list[int], float]:
    start = time.perf_counter()
    new, _ = engine.decode(logits, cache, n, attention=attention, stop=set())
    return new, (time.perf_counter() - start) * 1000 / max(1, len(new) - 1)


def _louiskv_run(
    engine, out, n, config: LouisKVConfig, units_from: LouisKV | None = None
) -> tuple[list[int], float, dict[str, Any], LouisKV]:
    """Decode `n` tokens with LouisKV (`config`) from the full prefill `out` (reading the prompt's units
    from `units_from` if given); returns the tokens, ms/token, the stats (with `offload_s`) and the
    retriever (not released: the caller releases it)."""
    store = _store() if units_from is None else units_from.store
    r = LouisKV(engine, config, store)
    start = time.perf_counter()
    cache = r.offload(out.cache.clone(), units_from=units_from)
    offload_s = time.perf_counter() - start
    new, ms = _decode(engine, out.logits[0, -1], cache, n, r.attention)
    stats = dict(r.stats.as_dict(), offload_s=offload_s)
    return new, ms, stats, r


def _variants(cfg: BenchConfig, every: bool = False) -> list[tuple[str, LouisKVConfig]]:
    """LouisKV's defaults at every budget; at the middle one also the short-answer taus of either trigger
    (`ANSWER_TAU` adjacent, `ANCHOR_TAU` anchor), the step-level trigger (`STEP_TAU`) and the periodic
    baseline (every `DEFAULT_PERIOD` steps), each also with `follow`, the periodic one every 8 steps with
    `follow`, and retrieval at every step (with and without `follow`). Only `cfg.methods` unless `every`."""
    middle = cfg.budgets[len(cfg.budgets) // 2]
    answer = dict(budget=middle, tau=ANSWER_TAU, trigger="adjacent")
    anchor = dict(budget=middle, tau=ANCHOR_TAU, trigger="anchor")
    step = dict(budget=middle, tau=STEP_TAU, trigger=STEP_TRIGGER, scope="step", step_layers=STEP_LAYERS)
    periodic = dict(budget=middle, trigger="periodic")
    rows = [(f"louiskv-{b}", LouisKVConfig(budget=b)) for b in cfg.budgets]
    rows += [
        (f"louiskv-answer-{middle}", LouisKVConfig(**answer)),
        (f"louiskv-anchor-{middle}", LouisKVConfig(**anchor)),
        (f"louiskv-follow-{middle}", LouisKVConfig(**answer, follow=FOLLOW)),
        (f"louiskv-anchor-follow-{middle}", LouisKVConfig(**anchor, follow=FOLLOW)),
        (f"louiskv-step-{middle}", LouisKVConfig(**step)),
        (f"louiskv-step-follow-{middle}", LouisKVConfig(**step, follow=FOLLOW)),
        (f"louiskv-periodic-{middle}", LouisKVConfig(**periodic)),
        (f"louiskv-periodic-follow-{middle}", LouisKVConfig(**periodic, follow=FOLLOW)),
        # the step trigger's rate on the probes (0.14 of steps): does its timing beat a schedule?
        (f"louiskv-periodic8-follow-{middle}", LouisKVConfig(**periodic, period=8, follow=FOLLOW)),
        (f"every-step-{middle}", LouisKVConfig(budget=middle, tau=EVERY_STEP)),
        (f"every-step-follow-{middle}", LouisKVConfig(budget=middle, tau=EVERY_STEP, follow=FOLLOW)),
    ]
    if every or cfg.methods is None:
        return rows
    return [(name, config) for name, config in rows if name in cfg.methods]


def _probe_seed(depth: float, seed: int) -> int:
    return int(depth * 100) + 1000 * seed  # seed 0: the earlier runs' probes


def probe_key(row: dict[str, Any]) -> tuple:
    """The probe an accuracy row belongs to: (task, length, depth, seed)."""
    return (row["task"], row["length"], row["depth"], row.get("seed", 0))


def load_rows(path: str | Path | None) -> list[dict[str, Any]]:
    if path is None or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy(engine: Engine, cfg: BenchConfig, texts: list[str]) -> list[dict[str, Any]]:
    """One row per (task, length, seed, depth, method): correct, decode ms/token, retrieval counters.
    Probes run seed by seed (every depth and task of a seed before the next), so a run stopped early
    still covers all depths."""
    rows = load_rows(cfg.results)
    done = {probe_key(r) for r in rows}
    for length in cfg.lengths:
        for seed in cfg.seeds:
            for depth in cfg.depths:
                for task in cfg.tasks:
                    if (task, length, depth, seed) in done:
                        continue
                    if cfg.stop_at is not None and time.time() > cfg.stop_at:
                        return rows
                    probe_rows = _probe_rows(engine, cfg, texts, task, length, depth, seed)
                    rows += probe_rows
                    if cfg.results is not None:
                        with open(cfg.results, "a") as f:
                            f.writelines(json.dumps(r) + "\n" for r in probe_rows)
    return rows


def _probe_rows(
    engine: Engine, cfg: BenchConfig, texts: list[str], task: str, length: int, depth: float, seed: int
) -> list[dict[str, Any]]:
    s = _probe_seed(depth, seed)
    if task == "passkey":
        probe = passkey(engine.tokenizer, length, depth, seed=s)
    else:
        probe = needle(engine.tokenizer, texts, length, depth, seed=s)
    start = time.perf_counter()
    out = engine.forward(probe.ids)
    base = dict(task=task, length=length, depth=depth, seed=seed, answer=probe.answer)
    new, ms = _decode(engine, out.logits[0, -1], out.cache.clone(), cfg.answer_tokens)
    rows = [
        dict(
            base,
            method="full",
            correct=_hit(engine, new, probe.answer),
            ms_per_token=ms,
            text=engine.tokenizer.decode(new),
            prefill_s=time.perf_counter() - start,
        )
    ]
    first: LouisKV | None = None  # its prompt units serve the other variants (same clustering)
    for name, config in _variants(cfg):
        new, ms, stats, r = _louiskv_run(engine, out, cfg.answer_tokens, config, first)
        if first is None:
            first = r
        else:
            r.release()
        rows.append(
            dict(
                base,
                method=name,
                correct=_hit(engine, new, probe.answer),
                ms_per_token=ms,
                text=engine.tokenizer.decode(new),
                offload_s=stats["offload_s"],
                **_counters(stats),
            )
        )
    if first is not None:
        first.release()
    return rows


def long_output(engine: Engine, cfg: BenchConfig, texts: list[str]) -> dict[str, Any]:
    """Greedy match length over `long_output_tokens` vs full of LouisKV at `long_budget` (default tau;
    every step) and, when `cfg.methods` names some, of those accuracy variants too (their own budgets)."""
    chosen, used = [], 0
    for t in texts:
        if used >= cfg.long_prompt_tokens - 80:
            break
        chosen.append(t)
        used += len(engine.tokenizer(t)["input_ids"])
    prompt = build_chat(
        engine.tokenizer, "Summarize these passages in detail, one paragraph per passage.", chosen
    )
    out = engine.forward(prompt.ids)
    n = cfg.long_output_tokens
    full, full_ms = _decode(engine, out.logits[0, -1], out.cache.clone(), n)
    result: dict[str, Any] = dict(prompt_tokens=len(prompt.ids), tokens=n, full_ms_per_token=full_ms)
    runs = [
        ("louiskv", LouisKVConfig(budget=cfg.long_budget)),
        ("every_step", LouisKVConfig(budget=cfg.long_budget, tau=EVERY_STEP)),
    ]
    runs += _variants(cfg) if cfg.methods is not None else []
    first: LouisKV | None = None  # its prompt units serve the other runs (same clustering)
    for name, config in runs:
        new, ms, stats, r = _louiskv_run(engine, out, n, config, first)
        if first is None:
            first = r
        else:
            r.release()
        result[name] = dict(
            match_length=_match(full, new), same_tokens=_same(full, new), ms_per_token=ms, **_counters(stats)
        )
    if first is not None:
        first.release()
    return result


def rekv(engine: Engine, cfg: BenchConfig, texts: list[str], tokens: int) -> dict[str, Any]:
    """Block recall@k and answer accuracy for facts planted at known blocks of a `tokens`-long stream
    (evenly spread, `stream_facts` per 4K tokens), vs the full cache."""
    c = cfg.rekv
    blocks_total = (tokens - c.n_init) // c.block_tokens
    n_facts = min(len(FACTS), max(1, cfg.stream_facts * tokens // 4096))
    blocks = [int((i + 0.5) * blocks_total / n_facts) for i in range(n_facts)]
    seed = 7 if tokens == 4096 else tokens  # 7: the stream of the earlier README runs
    stream = fact_stream(engine.tokenizer, texts, tokens, blocks, c.block_tokens, c.n_init, seed=seed)
    r = ReKV(engine, c, _store())
    start = time.perf_counter()
    r.encode(stream.ids)
    encode_s = time.perf_counter() - start
    full = engine.forward(stream.ids, logits="none").cache
    facts = []
    for fact in stream.facts:
        want = r.block_of(fact.position)
        new = r.answer(fact.question, cfg.answer_tokens, stop=set(), focus=fact.focus)
        recall = sum(want in sel for sel in r.last_selection.values()) / len(r.last_selection)
        base, _ = engine.generate(fact.question, cfg.answer_tokens, cache=full.clone(), stop=set())
        facts.append(
            dict(
                block=want,
                recall=recall,
                correct=_hit(engine, new, fact.answer),
                full_correct=_hit(engine, base, fact.answer),
            )
        )
    stats = r.stats.as_dict()
    return dict(
        stream_tokens=len(stream.ids),
        blocks=r.num_blocks,
        top_k=c.top_k,
        encode_s=encode_s,
        recall_at_k=sum(f["recall"] for f in facts) / len(facts),
        accuracy=sum(f["correct"] for f in facts) / len(facts),
        full_accuracy=sum(f["full_correct"] for f in facts) / len(facts),
        facts=facts,
        resident_bytes_peak=stats["peak_resident_bytes"],
        budget_bytes=r.budget_bytes,
        stream_kv_bytes=len(stream.ids) * engine.spec.kv_bytes_per_token,
        bytes_fetched=stats["bytes_fetched"],
    )


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Accuracy and mean counters per (method, length)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        key = f"{row['method']}@{row['length']}"
        zero = {"n": 0, "correct": 0, "ms": 0.0, "rate": 0.0, "step_rate": 0.0, "mb_fetched": 0.0}
        out.setdefault(key, zero)
        s = out[key]
        s["n"] += 1
        s["correct"] += row["correct"]
        s["ms"] += row["ms_per_token"]
        s["rate"] += row.get("retrieval_rate", 0.0)
        s["rate_after_first"] = s.get("rate_after_first", 0.0) + row.get("retrieval_rate_after_first", 0.0)
        s["step_rate"] += row.get("step_retrieval_rate", 0.0)
        s["step_after"] = s.get("step_after", 0.0) + row.get("step_retrieval_rate_after_first", 0.0)
        s["mb_fetched"] += row.get("bytes_fetched", 0) / 1e6
    paired = _paired(rows)
    for key, s in out.items():
        n = s.pop("n")
        out_row = {"accuracy": s["correct"] / n, "correct": s["correct"], "ms_per_token": s["ms"] / n}
        out_row.update(retrieval_rate=s["rate"] / n, retrieval_rate_after_first=s["rate_after_first"] / n)
        out_row.update(step_retrieval_rate=s["step_rate"] / n, mb_fetched=s["mb_fetched"] / n, probes=n)
        out_row.update(step_retrieval_rate_after_first=s["step_after"] / n)
        out_row.update(paired.get(key, {}))
        s.clear()
        s.update(out_row)
    return out


def _paired(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per method@length, on the probes it shares with the full cache and with every-step retrieval:
    how many it got right where the reference did not (wins) and the reverse (losses), and how many of
    its answers are the full cache's answer to the letter (`same_text_as_full`, when texts were kept)."""
    by_probe: dict[tuple, dict[str, bool]] = {}
    texts: dict[tuple, dict[str, str]] = {}
    for r in rows:
        probe = probe_key(r)
        by_probe.setdefault(probe, {})[r["method"]] = bool(r["correct"])
        if "text" in r:
            texts.setdefault(probe, {})[r["method"]] = r["text"]
    out: dict[str, dict[str, int]] = {}
    for probe, methods in by_probe.items():
        length = probe[1]
        refs = {"full": "full"} | {m: _reference_label(m) for m in methods if _reference_label(m)}
        said = texts.get(probe, {})
        for m, ok in methods.items():
            d = out.setdefault(f"{m}@{length}", {})
            if m != "full" and m in said and "full" in said:
                d["same_text_as_full"] = d.get("same_text_as_full", 0) + (said[m] == said["full"])
            for ref, label in refs.items():
                if ref == m or ref not in methods:
                    continue
                d[f"wins_vs_{label}"] = d.get(f"wins_vs_{label}", 0) + (ok and not methods[ref])
                d[f"losses_vs_{label}"] = d.get(f"losses_vs_{label}", 0) + (methods[ref] and not ok)
    return out


def matching_texts(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> str:
    """ "k/n": of the n rows of `new` whose (probe, method) `old` also decoded, k gave the same text (the
    decode is deterministic, so a match says an earlier run's rows can be paired with a new run's)."""
    said = {(probe_key(r), r["method"]): r["text"] for r in old}
    same = [
        said[(probe_key(r), r["method"])] == r["text"] for r in new if (probe_key(r), r["method"]) in said
    ]
    return f"{sum(same)}/{len(same)}"


def backfill_step_rate_after_first(rows: list[dict[str, Any]], steps: int) -> None:
    """Rows of runs that did not record `step_retrieval_rate_after_first` get it from their step rate over
    `steps` decode steps (the first always retrieves)."""
    for r in rows:
        if r["method"] != "full":
            r.setdefault(
                "step_retrieval_rate_after_first",
                (r.get("step_retrieval_rate", 0.0) * steps - 1) / (steps - 1),
            )


TABLE_COLUMNS = (
    "method | correct | same answer as full | wins / losses vs full | wins / losses vs every step | "
    "(layer, step) rate | without the first step | steps with a retrieval | without the first step | "
    "MB fetched per probe | decode ms/token"
)


def markdown_table(
    summary: dict[str, dict[str, float]], marked: tuple[str, ...] = (), label: str = "", digits: int = 2
) -> list[str]:
    """`summarize`'s output as README table lines: the full cache first, every-step rows last; methods in
    `marked` get " (label)" (rows paired in from an earlier run)."""
    lines = ["| " + TABLE_COLUMNS + " |", "|" + "---|" * len(TABLE_COLUMNS.split("|"))]
    for key in sorted(summary, key=lambda k: (not k.startswith("full@"), k.startswith("every"), k)):
        v, name = summary[key], key.split("@")[0]
        cells = [
            name + (f" ({label})" if name in marked else ""),
            f"{v['correct']}/{v['probes']}",
            "-" if name == "full" else f"{v.get('same_text_as_full', '-')}/{v['probes']}",
            "-" if name == "full" else f"{v['wins_vs_full']} / {v['losses_vs_full']}",
            "-"
            if "every" in key
            else f"{v.get('wins_vs_every_step', 0)} / {v.get('losses_vs_every_step', 0)}",
        ]
        if name == "full":
            cells += ["-"] * 5
        else:
            rates = ("retrieval_rate", "retrieval_rate_after_first", "step_retrieval_rate")
            cells += [f"{v[k]:.{digits}f}" for k in (*rates, "step_retrieval_rate_after_first")]
            cells += [f"{v['mb_fetched']:.0f}"]
        cells += [f"{v['ms_per_token']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_label(method: str) -> str | None:
    """The paired-count label of a reference method (retrieval at every step, with or without follow)."""
    for prefix, label in (("every-step-follow-", "every_step_follow"), ("every-step-", "every_step")):
        if method.startswith(prefix) and method[len(prefix) :].isdigit():
            return label
    return None


def run(engine: Engine, cfg: BenchConfig, plot: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    texts = passages(limit=60)
    start = time.perf_counter()
    result: dict[str, Any] = dict(config=_jsonable(asdict(cfg)))
    if "accuracy" in cfg.parts:
        result["rows"] = accuracy(engine, cfg, texts)
        result["accuracy"] = summarize(result["rows"])
    if "long_output" in cfg.parts:
        result["long_output"] = long_output(engine, cfg, texts)
    if "rekv" in cfg.parts:
        result["rekv"] = [rekv(engine, cfg, texts, n) for n in cfg.stream_tokens]
    result["wall_s"] = time.perf_counter() - start
    if plot is not None and "accuracy" in cfg.parts:
        draw(result, plot)
    return result


def draw(result: dict[str, Any], path: Path) -> None:
    """Accuracy (with the number right out of the probes) and (layer, step) retrieval rate per method and
    length; ReKV recall per planted block when the run measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    panels = 3 if result.get("rekv") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    methods = sorted({k.split("@")[0] for k in acc}, key=_method_order)
    lengths = sorted({int(k.split("@")[1]) for k in acc})
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(lengths))]
        rows = [acc.get(f"{m}@{n}", {}) for n in lengths]
        axes[0].bar(xs, [r.get("accuracy", 0) for r in rows], width, label=m, color=f"C{i}")
        for x, r in zip(xs, rows, strict=True):
            if r:
                axes[0].text(
                    x, r["accuracy"] + 0.01, f"{r['correct']}/{r['probes']}", ha="center", fontsize=6
                )
        if m != "full":
            axes[1].bar(xs, [r.get("retrieval_rate", 0) for r in rows], width, label=m, color=f"C{i}")
            after = [r.get("retrieval_rate_after_first", 0) for r in rows]
            axes[1].scatter(xs, after, color="black", marker="_", s=60, zorder=3)
            steps = [r.get("step_retrieval_rate", 0) for r in rows]
            axes[1].scatter(xs, steps, color="black", marker="x", s=20, zorder=3)
    axes[1].axhline(0.3, color="grey", linestyle="--", linewidth=0.8)
    titles = (
        "passkey + needle accuracy",
        "retrieval rate: bars (layer, step), dash without the first step,\nx steps with a retrieval",
    )
    for ax, title in zip(axes[:2], titles, strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"{n} tokens" for n in lengths])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    if panels == 3:
        ax = axes[2]
        for i, stream in enumerate(result["rekv"]):
            facts = stream["facts"]
            xs = [i * 10 + j for j in range(len(facts))]
            label = f"{stream['stream_tokens']} tokens, {stream['blocks']} blocks"
            ax.bar(xs, [f["recall"] for f in facts], label=label)
            for x, f in zip(xs, facts, strict=True):
                ax.text(x, 0.02, str(f["block"]), ha="center", fontsize=7, rotation=90)
        ax.set_xticks([])
        ax.set_title(
            f"ReKV recall@{result['rekv'][0]['top_k']} per planted block (label: block id)", fontsize=9
        )
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _method_order(method: str) -> tuple[int, int]:
    kind = (
        "full",
        "louiskv",
        "louiskv-answer",
        "louiskv-anchor",
        "louiskv-follow",
        "louiskv-anchor-follow",
        "louiskv-step",
        "louiskv-step-follow",
        "louiskv-periodic",
        "louiskv-periodic-follow",
        "louiskv-periodic8-follow",
        "every-step",
        "every-step-follow",
    )
    name, _, budget = method.rpartition("-")
    if not budget.isdigit():
        return (0, 0)
    return (kind.index(name) if name in kind else len(kind), int(budget))


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "retrieval_rate",
        "retrieval_rate_after_first",
        "step_retrieval_rate",
        "step_retrieval_rate_after_first",
        "bytes_fetched",
        "tokens_fetched",
        "peak_resident_bytes",
    )
    return {k: stats[k] for k in keys}


def _hit(engine: Engine, ids: list[int], answer: str) -> bool:
    return answer in engine.tokenizer.decode(ids)


def _match(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _same(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(1, len(a))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
