"""Fixtures for the kvstore tests (real tensors, real files, real Redis)."""

from __future__ import annotations

import pytest
from kvstore_helpers import TINY

from kvstore import Namespace


@pytest.fixture
def tiny_ns() -> Namespace:
    return Namespace("tiny-model", TINY)


@pytest.fixture
def own_redis_paused(tmp_path):
    """A private redis-server that a test can stall (SIGSTOP) and resume: (pause, resume, url)."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server binary not installed (CI=true: this must not be skipped)")
        pytest.skip("redis-server binary not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, cwd=tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            if redis.Redis.from_url(url).ping():
                break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield (lambda: os.kill(proc.pid, signal.SIGSTOP)), (lambda: os.kill(proc.pid, signal.SIGCONT)), url
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(timeout=10)
