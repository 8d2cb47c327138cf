"""Session-wide fixtures: one loaded model per test session, a reachable Redis, the evaluation data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from redis_keys import delete_prefix, keys_under, redis_test_prefix

from engine.paths import data_dir

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def loaded():
    """The default model (SmolLM2-135M-Instruct), loaded once per session through the weight cache."""
    from engine.loader import load_model

    return load_model()


@pytest.fixture(scope="session")
def engine(loaded):
    from engine.runner import Engine

    return Engine(loaded)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    if not path.is_dir():
        # The data is not part of the repo (SOURCES.md): a machine without it skips, in CI too.
        pytest.skip(f"evaluation data folder {path} is absent (set KVFUSE_DATA to its location)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url():
    """A reachable Redis: `$KVFUSE_TEST_REDIS_URL`, the local 6379, or a redis-server started here."""
    url = os.environ.get("KVFUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _ping(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        _skip_or_fail(f"no Redis at {url} and no redis-server binary to start one")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(50):
        if _ping(url):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        _skip_or_fail(f"started redis-server on port {port} but it never answered")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_prefix(redis_url, request):
    """A unique key prefix for one test, free of glob syntax; every key under it is deleted afterwards.
    Keys that appear under it during the cleanup (a writer the test left running, such as a server
    torn down after this fixture) are a warning: failing there would fail the test at random."""
    import redis

    prefix = redis_test_prefix(request.node.nodeid)
    yield prefix
    client = redis.Redis.from_url(redis_url)
    delete_prefix(client, prefix)
    left = keys_under(client, prefix)
    if left:
        warnings.warn(
            f"{len(left)} Redis keys appeared under {prefix!r} during cleanup: {left[:3]}", stacklevel=1
        )
        delete_prefix(client, prefix)
