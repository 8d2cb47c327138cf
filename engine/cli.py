"""The `kvfuse` console command. Each package adds its subcommands with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

# Packages that contribute subcommands: each has a `cli.py` with `register(subparsers)`.
SUBCOMMAND_MODULES: list[str] = [
    "kvstore.cli",
    "kvstore.server_cli",
    "retrieval.cli",
    "blend.cli",
    "compress.cli",
    "semcache.cli",
]


def _info(args: argparse.Namespace) -> int:
    import torch

    from engine import __version__
    from engine.loader import load_model

    loaded = load_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "kvfuse": __version__,
        "torch": torch.__version__,
        "device": device,
        "model": loaded.model_id,
        "source": str(loaded.source),
        "weights_from_cache": loaded.from_cache,
        "spec": loaded.spec.describe(),
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfuse", description="KV-cache service and RAG cache layer")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the version, the torch device and the model's shape")
    info.add_argument(
        "--model", default=None, help="a .gguf file or HF checkpoint folder (default: SmolLM2-135M)"
    )
    info.set_defaults(func=_info)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:
        print(f"kvfuse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
