"""`kvfuse store stats|ls|clear`: inspect or empty a disk store folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvstore.format import PREFIX_BYTES, CorruptEntry, read_header
from kvstore.pins import FILE_NAME as PINS_FILE
from kvstore.tiers.disk import DiskTier


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("store", help="inspect or clear a disk KV store folder")
    actions = parser.add_subparsers(dest="store_command", required=True)
    for name, func, text in [
        ("stats", _stats, "entries and bytes held (one JSON object)"),
        ("ls", _ls, "one JSON line per entry, least recently used first"),
        ("clear", _clear, "delete every entry (needs --yes)"),
    ]:
        sub = actions.add_parser(name, help=text)
        sub.add_argument("path", help="the disk tier folder (StoreConfig.disk_path)")
        sub.set_defaults(func=func)
        if name == "clear":
            sub.add_argument("--yes", action="store_true", help="really delete")
        if name == "ls":
            sub.add_argument("--limit", type=int, default=None, help="print at most this many entries")


def _open(path: str) -> DiskTier:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"store folder {str(folder)!r} does not exist")
    return DiskTier(folder, capacity_bytes=sys.maxsize)  # never trim what we only inspect


def _stats(args: argparse.Namespace) -> int:
    usage = _open(args.path).usage()
    print(json.dumps({"path": args.path, "entries": usage.entries, "bytes": usage.bytes}))
    return 0


def _ls(args: argparse.Namespace) -> int:
    disk = _open(args.path)
    for key in disk.keys()[: args.limit]:
        row: dict[str, Any] = {"key": key, "bytes": disk.size_of(key)}
        try:
            with open(disk.path(key), "rb") as f:
                header = read_header(f.read(PREFIX_BYTES), f.read)
            layout: dict[str, Any] = header.get("layout", {})
            row.update(
                method=layout.get("method"),
                dtype=layout.get("dtype"),
                tensors={t["name"]: t["shape"] for t in header.get("tensors", [])},
                meta=header.get("meta") or {},
            )
        except (OSError, CorruptEntry) as e:
            row["error"] = str(e)
        print(json.dumps(row))
    return 0


def _clear(args: argparse.Namespace) -> int:
    if not args.yes:
        raise ValueError(f"refusing to delete every entry in {args.path!r} without --yes")
    disk = _open(args.path)
    count = len(disk.keys())
    disk.clear()
    (disk.root / PINS_FILE).unlink(missing_ok=True)  # the pins of entries that are gone
    print(json.dumps({"path": args.path, "removed": count}))
    return 0
