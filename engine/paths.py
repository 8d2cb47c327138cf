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


# Where the team's machines keep the evaluation data when a checkout is not next to it (a CI clone).
_KNOWN_DATA_DIRS = (Path("/work/shared/data"),)


def data_dir() -> Path:
    """The evaluation data: `$KVFUSE_DATA`, else `../shared/data` next to the checkout, else a known place."""
    env = os.environ.get("KVFUSE_DATA")
    if env:
        return Path(env).expanduser()
    beside = REPO_ROOT.parent / "shared" / "data"
    return next((p for p in (beside, *_KNOWN_DATA_DIRS) if p.is_dir()), beside)
