"""Fixtures for the kvstore tests (real tensors, real files, real Redis)."""

from __future__ import annotations

import pytest
from kvstore_helpers import TINY, start_redis

from kvstore import Namespace


@pytest.fixture
def tiny_ns() -> Namespace:
    return Namespace("tiny-model", TINY)


@pytest.fixture
def own_redis_paused(tmp_path):
    """A private redis-server that a test can stall (SIGSTOP) and resume: (pause, resume, url)."""
    import os
    import signal

    proc, port = start_redis(tmp_path)
    yield (
        (lambda: os.kill(proc.pid, signal.SIGSTOP)),
        (lambda: os.kill(proc.pid, signal.SIGCONT)),
        f"redis://127.0.0.1:{port}/0",
    )
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(timeout=10)
