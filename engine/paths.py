"""Where kvfuse keeps its files and finds the shared evaluation data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def kvfuse_home() -> Path:
    """Root folder for caches and stores: `$KVFUSE_HOME`, else `$XDG_CACHE_HOME/kvfuse` (~/.cache/kvfuse)."""
    env = os.environ.get("KVFUSE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kvfuse"


def data_dir() -> Path:
    """The evaluation data (`../shared/data` next to the checkout unless `$KVFUSE_DATA` says otherwise)."""
    env = os.environ.get("KVFUSE_DATA")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
