"""LMCache's own RemoteBackend against our lm:// port, where an LMCache install is available.

LMCache is not a dependency (about 2 GB); point `$KVFUSE_LMCACHE_PYTHON` at a Python that has it, e.g.
`python -m venv /tmp/lmc && /tmp/lmc/bin/pip install lmcache` (or run pytest from such a venv).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from server_helpers import REPO


def _lmcache_python() -> str | None:
    configured = os.environ.get("KVFUSE_LMCACHE_PYTHON")
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("lmcache") is not None else None


def test_lmcache_remote_backend_uses_our_server(request):
    python = _lmcache_python()
    if python is None:
        pytest.skip("no lmcache installed (set KVFUSE_LMCACHE_PYTHON to a Python that has it)")
    server = request.getfixturevalue("server")  # only started when the test runs
    done = subprocess.run(
        [python, str(REPO / "tests" / "server" / "lmcache_client.py"), str(server.lm_port)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["contains"] == [True, True, True] and result["exact"] == [True, True, True]
    assert result["missing_contains"] is False and result["missing_get"] is False
