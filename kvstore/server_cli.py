"""`kvfuse serve` and the admin client subcommands (stats, health, ls, inspect, evict, clear, pin, unpin,
config). Client commands talk to `--url` (default `$KVFUSE_URL`, else http://127.0.0.1:8000) with
`--api-key` (default `$KVFUSE_API_KEY`) and print JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from kvstore.http_client import KVClient, ServerError

DEFAULT_URL = "http://127.0.0.1:8000"

# serve flags -> ServerSettings fields (unset flags leave env/config/defaults alone)
_SERVE_FLAGS = {
    "host": ("--host", str, "bind address (default 127.0.0.1: this machine only)"),
    "port": ("--port", int, "HTTP port (default 8000)"),
    "lm_port": ("--lm-port", int, "also serve LMCache's lm:// protocol on this TCP port"),
    "lm_host": ("--lm-host", str, "lm:// bind address (default 127.0.0.1; the protocol has no auth)"),
    "config": ("--config", str, "TOML file of settings (also $KVFUSE_CONFIG)"),
    "host_bytes": ("--host-bytes", str, "host RAM tier size, e.g. 4GiB"),
    "disk_path": ("--disk-path", str, "disk tier folder (default $KVFUSE_HOME/store)"),
    "disk_bytes": ("--disk-bytes", str, "disk tier size, e.g. 32GiB; 0 turns the disk tier off"),
    "redis_url": ("--redis-url", str, "shared Redis tier (also $KVFUSE_REDIS_URL)"),
    "log_level": ("--log-level", str, "debug, info, warning, error"),
}


def _serve(args: argparse.Namespace) -> int:
    import server
    from kvstore.service.settings import ServerSettings

    overrides = {f: getattr(args, f) for f in _SERVE_FLAGS if getattr(args, f) is not None}
    server.run(ServerSettings(**overrides))
    return 0


def _client(args: argparse.Namespace) -> KVClient:
    return KVClient(args.url, api_key=args.api_key or None)


def _print(value: Any) -> int:
    print(json.dumps(value, indent=2))
    return 0


def _pin(client: KVClient, key: str, pinned: bool) -> dict[str, Any]:
    (client.pin if pinned else client.unpin)(key)
    return {"key": key, "pinned": pinned}


def _clear(client: KVClient, args: argparse.Namespace) -> Any:
    if args.tier is None and not args.all:
        raise ValueError("say which: --tier NAME, or --all for every tier")
    return client.clear(args.tier)


def _config(client: KVClient, args: argparse.Namespace) -> Any:
    if not args.set:
        return client.config()
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        changes[name] = value
    return client.set_config(**changes)


_ADMIN: dict[str, tuple[str, Callable[[KVClient, argparse.Namespace], Any]]] = {
    "stats": ("per-tier entries, bytes, hits, misses, evictions", lambda c, a: c.stats()),
    "health": ("tiers reachable, disk writable, queue depth", lambda c, a: c.health()),
    "ls": ("list stored entries (paged)", lambda c, a: c.entries(a.offset, a.limit, a.prefix)),
    "inspect": ("where an entry lives and what it holds", lambda c, a: c.inspect(a.key)),
    "evict": (
        "remove an entry, or every entry with a key prefix",
        lambda c, a: {"removed": c.evict(a.key, a.prefix)},
    ),
    "clear": ("empty one tier (--tier) or the whole store (--all)", _clear),
    "pin": ("never evict an entry", lambda c, a: _pin(c, a.key, True)),
    "unpin": ("make a pinned entry evictable again", lambda c, a: _pin(c, a.key, False)),
    "config": ("show the running configuration, or --set NAME=VALUE live fields", _config),
}


def _admin_args(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("inspect", "pin", "unpin"):
        p.add_argument("key")
    elif name == "ls":
        p.add_argument("--prefix", default="")
        p.add_argument("--offset", type=int, default=0)
        p.add_argument("--limit", type=int, default=100)
    elif name == "evict":
        p.add_argument("key", nargs="?")
        p.add_argument("--prefix", default=None)
    elif name == "clear":
        p.add_argument("--tier", default=None)
        p.add_argument("--all", action="store_true")
    elif name == "config":
        p.add_argument("--set", action="append", metavar="NAME=VALUE")


def _run_admin(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if name == "evict" and (args.key is None) == (args.prefix is None):
            raise ValueError("evict takes a KEY or --prefix P (exactly one)")
        try:
            return _print(_ADMIN[name][1](_client(args), args))
        except (KeyError, ServerError) as e:
            print(f"kvfuse {name}: {e}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the KV-cache service (HTTP, optionally lm://)")
    for field, (flag, kind, help_text) in _SERVE_FLAGS.items():
        serve.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    serve.set_defaults(func=_serve)
    for name, (help_text, _) in _ADMIN.items():
        p = subparsers.add_parser(name, help=f"server admin: {help_text}")
        p.add_argument("--url", default=os.environ.get("KVFUSE_URL", DEFAULT_URL), help="server URL")
        p.add_argument(
            "--api-key", default=os.environ.get("KVFUSE_API_KEY"), help="API key (or $KVFUSE_API_KEY)"
        )
        _admin_args(name, p)
        p.set_defaults(func=_run_admin(name))
