"""Real `kvfuse serve` processes, one per configuration, shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import API_KEY, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default configuration: host RAM + disk, no API key, lm:// on."""
    s = start_server(tmp_path_factory.mktemp("server-default"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def secured(tmp_path_factory):
    """A server with an API key and a 1 MiB body limit."""
    s = start_server(
        tmp_path_factory.mktemp("server-secured"),
        {"KVFUSE_API_KEY": API_KEY, "KVFUSE_MAX_BODY_BYTES": "1MiB"},
    )
    yield s
    s.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of its own (for tests that clear, fill or restart the store)."""
    servers = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None, home: Path | None = None):
        s = start_server(home or tmp_path / f"home{len(servers)}", env, args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
