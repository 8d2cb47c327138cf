"""The compression benchmark: quality against KV bytes, every method against the same model's full cache.

For each context length: teacher forcing over a real-text continuation (KL, top-1, perplexity delta,
decode ms per token) and passkey retrieval (depths x keys, full-cache ceiling first). Settings: ThinK
lambda 0.25/0.4/0.5, kvpress's zeroing ThinK at the same lambdas, Chelsea keep 0.5/0.25/0.2 with and
without size-aware attention, Chelsea with `protect` (observation-window tokens kept unmerged, same
bytes as plain Chelsea at its keep), StreamingLLM and SnapKV at the measured bytes of each Chelsea
setting and of ThinK 0.4. Prints one JSON line; draws quality against KV bytes. `bench/compress.py` and
`kvfuse compress bench` run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compress.base import Compressor
from compress.chelsea import Chelsea
from compress.evaluate import (
    agreement,
    found,
    musique_text,
    nq_passages,
    passkey_trials,
    teacher_force,
    tokens_of,
)
from compress.kvpress_think import KVPressThinK, kvpress_version
from compress.runtime import attend, compress_cache, kv_bytes, observe
from compress.snapkv import SnapKV
from compress.streaming import StreamingLLM
from compress.think import ThinK
from engine.kvcache import KVCache, LayerKV
from engine.paths import data_dir
from engine.runner import Engine


@dataclass
class BenchConfig:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    continuation: int = 256  # teacher-forced steps
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    keys: int = 5  # passkeys per depth
    text: str | None = None  # a text file for teacher forcing (default: MuSiQue item `item`'s passages)
    item: int = 0
    question_in_prompt: bool = True  # passkey question compressed with the context (papers' protocol)
    answer_tokens: int = 6  # " " and five digits
    timed_steps: int = 8  # single-token steps timed after teacher forcing
    seed: int = 0
    only: list[str] | None = None  # a subset of the settings (with "full" and what "@" baselines match)

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 128 for n in self.lengths):
            raise ValueError(f"lengths must be >= 128 tokens each, got {self.lengths}")
        if self.continuation < 2:
            raise ValueError(f"continuation must be >= 2 tokens, got {self.continuation}")
        if self.timed_steps < 1:
            raise ValueError(f"timed_steps must be >= 1, got {self.timed_steps}")
        if any(not 0 <= d <= 1 for d in self.depths) or self.keys < 0:
            raise ValueError(f"depths must lie in [0, 1] and keys >= 0, got {self.depths}, {self.keys}")
        known = [s.name for s in settings()]
        unknown = sorted(set(self.only or []) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {known}")

    def wanted(self) -> set[str] | None:
        """The settings to run (None: all): `only`, the full cache and the settings `@` baselines match."""
        if self.only is None:
            return None
        return {"full", *self.only, *(name.split("@")[1] for name in self.only if "@" in name)}


@dataclass
class Setting:
    name: str
    family: str
    make: Callable[[dict[str, float]], Compressor | None]  # given the ratios measured so far


def settings() -> list[Setting]:
    """Every setting; eviction baselines come after the setting whose bytes they match."""
    out = [Setting("full", "full", lambda r: None)]
    for lam in (0.25, 0.4, 0.5):
        out.append(Setting(f"think_{lam}", "think", lambda r, lam=lam: ThinK(lam=lam)))
    for lam in (0.25, 0.4, 0.5):
        out.append(Setting(f"kvpress_think_{lam}", "kvpress_think", lambda r, lam=lam: KVPressThinK(lam=lam)))
    for keep in (0.5, 0.25, 0.2):
        for aware in (True, False):
            name = f"chelsea_{keep}" + ("" if aware else "_plain")
            out.append(Setting(name, "chelsea" if aware else "chelsea_plain", _chelsea(keep, aware)))
    for keep, protect in PROTECTED:
        out.append(
            Setting(f"chelsea_{keep}_protect{protect}", "chelsea_protect", _chelsea(keep, True, protect))
        )
    for match in ("chelsea_0.5", "chelsea_0.25", "chelsea_0.2", "think_0.4"):
        out.append(Setting(f"streaming@{match}", "streaming", lambda r, m=match: StreamingLLM(keep=r[m])))
        out.append(Setting(f"snapkv@{match}", "snapkv", lambda r, m=match: SnapKV(keep=r[m])))
    return out


PROTECTED = [(0.5, 0.25), (0.25, 0.25), (0.25, 0.5), (0.2, 0.25)]  # (keep, protect) of Chelsea settings


def _chelsea(keep: float, aware: bool, protect: float = 0.0) -> Callable[[dict[str, float]], Compressor]:
    return lambda r: Chelsea(keep=keep, size_aware=aware, protect=protect)


QUICK = BenchConfig(lengths=[512], continuation=32, depths=[0.3, 0.7], keys=1)


def dense_copy(cache: KVCache) -> KVCache:
    """The full cache, shareable: decoding appends new tensors and never writes into these."""
    return KVCache([LayerKV(lay.k, lay.v) for lay in cache.layers], cache.positions.clone())


def compressed_caches(
    engine: Engine, cache: KVCache, seen, wanted: set[str] | None = None
) -> dict[str, tuple[Setting, KVCache, int]]:
    """Every (wanted) setting's cache of one prompt and its bytes, in order."""
    out, ratios = {}, {}
    for s in settings():
        if wanted is not None and s.name not in wanted:
            continue
        compressor = s.make(ratios)
        c = dense_copy(cache) if compressor is None else compress_cache(engine, cache, compressor, seen)
        held, dense = kv_bytes(c)
        ratios[s.name] = held / dense
        out[s.name] = (s, c, held)
    return out


def teacher_forcing(engine: Engine, ids: list[int], n: int, config: BenchConfig) -> dict[str, dict]:
    prompt, cont = ids[:n], ids[n : n + config.continuation + 1]
    out, seen = observe(engine, prompt)
    caches = compressed_caches(engine, out.cache, seen, config.wanted())
    full = None
    rows = {}
    for name, (s, cache, held) in caches.items():
        forced = teacher_force(engine, cache, cont, timed=config.timed_steps)
        full = forced if full is None else full
        rows[name] = {"family": s.family, "kv_bytes": held, **agreement(full, forced)}
        _log(f"  {n} {name}: top1 {rows[name]['top1']:.3f} kl {rows[name]['kl']:.4f}")
    for row in rows.values():
        row["kv_ratio"] = row["kv_bytes"] / rows["full"]["kv_bytes"]
    return rows


def passkey(engine: Engine, config: BenchConfig, filler: list[str], n: int) -> dict[str, float]:
    """Accuracy per setting over depths x keys haystacks of `n` tokens."""
    trials = passkey_trials(engine, filler, n, config.depths, config.keys, config.seed)
    hits: dict[str, int] = {}
    for i, trial in enumerate(trials):
        prompt = trial.context + (trial.question if config.question_in_prompt else [])
        out, seen = observe(engine, prompt)
        for name, (_, cache, _) in compressed_caches(engine, out.cache, seen, config.wanted()).items():
            text = _answer(engine, cache, out.logits[0, -1], trial.question, config)
            hits[name] = hits.get(name, 0) + found(text, trial.key)
        _log(f"  passkey {n} trial {i + 1}/{len(trials)} depth {trial.depth}: full {hits['full']}")
    return {name: h / len(trials) for name, h in hits.items()} if trials else {}


@torch.inference_mode()
def _answer(engine: Engine, cache: KVCache, logits, question: list[int], config: BenchConfig) -> str:
    if not config.question_in_prompt:
        logits = engine.forward(question, cache=cache, attention=attend).logits[0, -1]
    new, _ = engine.decode(logits, cache, config.answer_tokens, attention=attend, stop=set())
    return engine.tokenizer.decode(new)


def run(engine: Engine, config: BenchConfig) -> dict:
    start = time.time()
    data = data_dir()
    text = Path(config.text).read_text() if config.text else musique_text(data, config.item)
    ids = tokens_of(engine, text)
    filler = [text] if config.text else nq_passages(data, 2000, config.seed)
    results = []
    for n in config.lengths:
        if len(ids) < n + config.continuation + 1:
            raise ValueError(f"the text has {len(ids)} tokens; {n} + {config.continuation + 1} are needed")
        _log(f"length {n}: teacher forcing over {config.continuation} tokens")
        forced = teacher_forcing(engine, ids, n, config)
        keys = passkey(engine, config, filler, n)
        rows = [
            {"length": n, "setting": name, **row, "passkey": keys.get(name)} for name, row in forced.items()
        ]
        _log("rows " + json.dumps(rows))  # a long run's finished lengths survive an interruption
        results.extend(rows)
    return {
        "bench": "compress",
        "model": engine.loaded.model_id,
        "config": asdict(config),
        "kvpress": kvpress_version() or "transcription of kvpress 0.5.5 ThinKPress",
        "results": results,
        "targets": targets(results),
        "elapsed_s": round(time.time() - start, 1),
    }


def targets(results: list[dict]) -> dict[str, dict]:
    """The issue's targets per length: ThinK 0.4 and Chelsea 0.25 (and its protected settings) against
    the full-cache ceiling and the eviction baselines at equal bytes; each part where its rows ran."""
    out = {}
    for n in sorted({r["length"] for r in results}):
        row = {r["setting"]: r for r in results if r["length"] == n}
        if "full" not in row:
            continue
        ceiling = row["full"]["passkey"]
        part: dict = {"ceiling": ceiling}
        if "think_0.4" in row:
            think = row["think_0.4"]
            part |= {
                "think_saving": 1 - think["kv_ratio"],
                "think_top1": think["top1"],
                "think_passkey": think["passkey"],
                "think_ok": 1 - think["kv_ratio"] >= 0.2
                and think["top1"] >= 0.95
                and think["passkey"] == ceiling,
            }
        if {"chelsea_0.25", "streaming@chelsea_0.25", "snapkv@chelsea_0.25"} <= set(row):
            chelsea = row["chelsea_0.25"]
            part |= {
                "chelsea_saving": 1 - chelsea["kv_ratio"],
                "chelsea_passkey": chelsea["passkey"],
                "eviction_passkey": {k: row[f"{k}@chelsea_0.25"]["passkey"] for k in ("streaming", "snapkv")},
                "chelsea_ok": _chelsea_ok(row, ceiling),
                "chelsea_protect": {
                    name: {
                        "passkey": row[name]["passkey"],
                        "top1": row[name]["top1"],
                        "same_bytes": row[name]["kv_bytes"] == chelsea["kv_bytes"],
                        "ok": _chelsea_ok(row, ceiling, name),
                    }
                    for keep, protect in PROTECTED
                    if keep == 0.25 and (name := f"chelsea_{keep}_protect{protect}") in row
                },
            }
        if len(part) > 1:
            out[str(n)] = part
    return out


def _chelsea_ok(row: dict, ceiling: float | None, name: str = "chelsea_0.25") -> bool | None:
    """Passkey within 5 points of the ceiling and above both eviction baselines at chelsea_0.25's bytes."""
    chelsea = row[name]["passkey"]
    if chelsea is None or ceiling is None or row[name]["kv_bytes"] != row["chelsea_0.25"]["kv_bytes"]:
        return None
    baselines = [row[f"{k}@chelsea_0.25"]["passkey"] for k in ("streaming", "snapkv")]
    return chelsea >= ceiling - 0.05 and all(chelsea > b for b in baselines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 3.6 * len(lengths)), squeeze=False)
    markers = {"full": "*", "think": "o", "kvpress_think": "x", "chelsea": "s", "chelsea_plain": "D",
               "streaming": "v", "snapkv": "^", "chelsea_protect": "P"}  # fmt: skip
    for ax_row, n in zip(axes, lengths, strict=True):
        for col, metric in enumerate(("top1", "passkey")):
            ax = ax_row[col]
            for i, (family, marker) in enumerate(markers.items()):  # fixed colours: families may be missing
                pts = [(r["kv_ratio"], r[metric]) for r in rows if r["length"] == n and r["family"] == family]
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), marker=marker, label=family, s=50, color=f"C{i}")
            ax.set_xlabel("KV bytes / full cache")
            ax.set_ylabel("top-1 agreement" if metric == "top1" else "passkey accuracy")
            ax.set_title(f"{n} tokens")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="512 tokens, 32 steps, 2 passkey trials")
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths (default 1024 2048 4096)")
    parser.add_argument("--continuation", type=int, help="teacher-forced tokens (default 256)")
    parser.add_argument("--depths", type=float, nargs="+", help="passkey depths (default 0.1 .. 0.9)")
    parser.add_argument("--keys", type=int, help="passkeys per depth (default 5; 0 skips passkey)")
    parser.add_argument("--text", help="a text file to use instead of MuSiQue passages")
    parser.add_argument(
        "--question-after", action="store_true", help="ask the passkey question after compression"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on shared cores 2 threads ran ~4x slower)"
    )
    parser.add_argument("--only", nargs="+", help="run only these settings (and what they need)")
    parser.add_argument("--plot", default="bench/out/compress.png", help="where to save the plot")


def config_from(args: argparse.Namespace) -> BenchConfig:
    base = asdict(QUICK) if args.quick else asdict(BenchConfig())
    for name in ("lengths", "continuation", "depths", "keys", "text", "only"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    base["question_in_prompt"] = not args.question_after
    return BenchConfig(**base)


def main(args: argparse.Namespace) -> int:
    from engine.loader import load_model

    config = config_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(Engine(load_model()), config)
    if args.plot:
        plot(report, Path(args.plot))
        report["plot"] = args.plot
    print(json.dumps(report))
    return 0
