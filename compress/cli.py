"""`kvfuse compress bench`: the compression benchmark on a chosen text (see compress/bench.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compress", help="KV compression (ThinK, Chelsea) tools")
    actions = parser.add_subparsers(dest="compress_command", required=True)
    bench = actions.add_parser(
        "bench", help="quality against KV bytes vs the full cache; prints one JSON line and saves a plot"
    )
    from compress.bench import add_arguments, main

    add_arguments(bench)
    bench.set_defaults(func=main)
