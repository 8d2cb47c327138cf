"""`kvfuse rag ingest` then `kvfuse rag ask` as real processes sharing a disk tier and a catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blend_cases import PASSAGES

REPO = Path(__file__).resolve().parents[2]


def kvfuse(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ingest_then_ask_reuses_the_stored_passages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVFUSE_RAG_DIR"}
    env["KVFUSE_RAG_DIR"] = str(tmp_path / "rag")
    env["OMP_NUM_THREADS"] = "1"  # short inputs: one thread is faster on shared cores
    store = ["--disk-path", str(tmp_path / "store"), "--json"]
    doc = tmp_path / "eiffel.txt"
    doc.write_text("\n\n".join(PASSAGES))

    done = kvfuse(["rag", "ingest", str(doc), *store], env)
    assert done.returncode == 0, done.stderr
    ingested = json.loads(done.stdout)
    assert ingested["computed"] == len(ingested["passages"]) >= 1

    asked = kvfuse(
        ["rag", "ask", "Who designed the Eiffel Tower?", "--top-k", "1", "--max-new-tokens", "8", *store], env
    )
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["reused_passages"] == 1 and answer["computed_passages"] == 0
    assert answer["text"]

    missing = kvfuse(["rag", "ingest", str(tmp_path / "nope.txt"), *store], env)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr
