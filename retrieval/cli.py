"""`kvfuse retrieval bench`: the retrieval benchmark from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("retrieval", help="KV retrieval (LouisKV, ReKV)")
    sub = parser.add_subparsers(dest="retrieval_command", required=True)
    bench = sub.add_parser("bench", help="accuracy, agreement, recall and cost vs the full cache (JSON line)")
    bench.add_argument("--quick", action="store_true", help="1K inputs, small budgets, short outputs")
    bench.add_argument("--lengths", type=int, nargs="+", help="input lengths (tokens)")
    bench.add_argument("--budgets", type=int, nargs="+", help="LouisKV budgets (resident tokens per head)")
    bench.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1]")
    bench.add_argument("--seeds", type=int, nargs="+", help="probe draws per (task, length, depth)")
    bench.add_argument("--answer-tokens", type=int, help="tokens decoded per accuracy probe")
    bench.add_argument("--results", help="JSONL of per-probe accuracy rows (appended; a rerun resumes)")
    bench.add_argument("--stop-at", help="UTC time HH:MM after which no new accuracy probe starts")
    bench.add_argument("--tasks", nargs="+", help="accuracy probes: passkey, needle")
    bench.add_argument("--methods", nargs="+", help="accuracy variants to run (e.g. every-step-512)")
    bench.add_argument("--long-output-tokens", type=int, help="tokens generated for the agreement test")
    bench.add_argument("--stream-tokens", type=int, nargs="+", help="ReKV stream lengths")
    bench.add_argument(
        "--only", nargs="+", help="run only these parts: accuracy, long_output, rekv (no plot unless all)"
    )
    bench.add_argument("--plot", type=Path, default=Path("bench/out/retrieval.png"), help="where to draw")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from engine.loader import load_model
    from engine.runner import Engine
    from retrieval.bench import BenchConfig, run

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {
        "lengths": tuple(args.lengths) if args.lengths else None,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "depths": tuple(args.depths) if args.depths else None,
        "long_output_tokens": args.long_output_tokens,
        "stream_tokens": tuple(args.stream_tokens) if args.stream_tokens else None,
        "parts": tuple(args.only) if args.only else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "answer_tokens": args.answer_tokens,
        "results": args.results,
        "stop_at": _utc_today(args.stop_at) if args.stop_at else None,
        "methods": tuple(args.methods) if args.methods else None,
        "tasks": tuple(args.tasks) if args.tasks else None,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    result = run(Engine(load_model()), cfg, plot=args.plot)
    args.plot.with_suffix(".json").write_text(json.dumps(result, indent=1))  # with every probe's row
    result.pop("rows", None)
    print(json.dumps(result))
    return 0


def _utc_today(hhmm: str) -> float:
    """Unix time of HH:MM UTC today."""
    from datetime import UTC, datetime

    hour, minute = (int(x) for x in hhmm.split(":"))
    return datetime.now(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()
