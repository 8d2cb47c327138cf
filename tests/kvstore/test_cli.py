"""`kvfuse store stats|ls|clear` on a real store folder, through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from kvstore_helpers import TINY

from engine.paths import REPO_ROOT
from kvstore import KVConnector, Namespace, StoreConfig, TieredStore


def _kvfuse(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", "store", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_stats_ls_clear(tmp_path):
    with TieredStore(StoreConfig(host_bytes=1 << 20, disk_path=str(tmp_path))) as store:
        KVConnector(store, Namespace("m", TINY)).store(list(range(10)), torch.zeros(TINY.chunk_shape(10)))
        store.pin(store.keys()[0])
    stats = json.loads(_kvfuse("stats", str(tmp_path)).stdout)
    assert stats["entries"] == 3 and stats["bytes"] == sum(f.stat().st_size for f in tmp_path.rglob("*.kvf"))
    rows = [json.loads(line) for line in _kvfuse("ls", str(tmp_path)).stdout.splitlines()]
    assert sorted(r["tensors"]["kv"][2] for r in rows) == [2, 4, 4] and {r["dtype"] for r in rows} == {
        "float32"
    }
    refused = _kvfuse("clear", str(tmp_path))
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert json.loads(_kvfuse("clear", str(tmp_path), "--yes").stdout)["removed"] == 3
    assert json.loads(_kvfuse("stats", str(tmp_path)).stdout)["entries"] == 0
    assert not (tmp_path / "pins.msgpack").exists()


def test_missing_folder_is_a_clear_error(tmp_path):
    run = _kvfuse("stats", str(tmp_path / "nope"))
    assert run.returncode == 2 and "does not exist" in run.stderr
