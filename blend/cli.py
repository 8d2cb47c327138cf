"""`kvfuse rag ingest FILE...` and `kvfuse rag ask QUESTION`: the RAG pipeline from the shell.

Passages' KV goes to a store with a host tier and a disk tier (default `$KVFUSE_HOME/store`, the server's
default too), and the passage catalog to `$KVFUSE_RAG_DIR/<tenant>` (default `$KVFUSE_HOME/rag`), so a
later `ask`, or a server started on the same folders, reuses what `ingest` computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from blend.fuse import METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    rag = subparsers.add_parser("rag", help="RAG pipeline: ingest documents, ask questions over them")
    sub = rag.add_subparsers(dest="rag_command", required=True)
    ingest = sub.add_parser("ingest", help="cut files into passages, precompute and store their KV")
    ingest.add_argument("files", nargs="+", help="text files (one document each; '-' reads stdin)")
    ingest.add_argument("--target-tokens", type=int, default=384, help="passage size to aim at")
    _common(ingest)
    ingest.set_defaults(func=_ingest)
    ask = sub.add_parser("ask", help="answer a question from ingested (or given) passages")
    ask.add_argument("question")
    ask.add_argument("--passage", action="append", help="a passage text (repeatable); default: retrieve")
    ask.add_argument("--top-k", type=int, default=4, help="passages to retrieve (default 4)")
    ask.add_argument("--method", default="cacheblend", choices=METHODS)
    ask.add_argument(
        "--ratio",
        type=_ratio,
        default=0.15,
        help="CacheBlend recompute ratio, or 'auto': max(0.15, what loading from the passages' tier costs)",
    )
    ask.add_argument("--max-new-tokens", type=int, default=64)
    _common(ask)
    ask.set_defaults(func=_ask)


def _ratio(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ratio must be a number in [0, 1] or 'auto', got {text!r}"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", default="default", help="whose passages (default: default)")
    p.add_argument("--disk-path", default=None, help="disk tier folder (default $KVFUSE_HOME/store)")
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _pipeline(args: argparse.Namespace, config):

    from blend.api import tenant_dir
    from blend.pipeline import RagPipeline
    from engine.loader import load_model
    from engine.paths import kvfuse_home
    from engine.runner import Engine
    from kvstore import StoreConfig, TieredStore

    disk = Path(args.disk_path) if args.disk_path else kvfuse_home() / "store"
    store = TieredStore(StoreConfig(host_bytes=2 << 30, disk_path=str(disk)))
    engine = Engine(load_model(args.model))
    folder = tenant_dir(args.tenant)
    return store, RagPipeline(engine, store, config=config, tenant=args.tenant, folder=folder)


def _ingest(args: argparse.Namespace) -> int:
    from blend.passages import SplitConfig
    from blend.pipeline import RagConfig

    config = RagConfig(
        split=SplitConfig(args.target_tokens, max(512, args.target_tokens)), progress=not args.json
    )
    docs = [{"id": name, "text": _read(name)} for name in args.files]
    store, pipeline = _pipeline(args, config)
    with store:
        result = pipeline.ingest(docs)
    if args.json:
        print(
            json.dumps(
                {
                    "passages": [asdict(p) | {"text": p.text[:80]} for p in result.passages],
                    "computed": result.computed,
                    "reused": result.reused,
                    "seconds": result.seconds,
                }
            )
        )
    else:
        print(
            f"{len(result.passages)} passages from {len(docs)} documents: {result.computed} computed, "
            f"{result.reused} already stored ({result.seconds:.1f} s)"
        )
    return 0


def _ask(args: argparse.Namespace) -> int:
    from blend.pipeline import RagConfig

    config = RagConfig(
        method=args.method,
        recompute_ratio=args.ratio,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        progress=False,
    )
    store, pipeline = _pipeline(args, config)
    with store:
        answer = pipeline.answer(args.question, passages=args.passage)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print(answer.text)
        print(
            f"[{answer.method}: TTFT {answer.ttft_s * 1000:.0f} ms, {answer.prompt_tokens} prompt tokens, "
            f"{answer.reused_passages} passages reused, {answer.computed_passages} computed]",
            file=sys.stderr,
        )
    return 0


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"document file {name!r} does not exist")
    return path.read_text()
