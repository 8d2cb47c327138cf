"""Real `kvfuse serve` processes for the server tests (kvstore.service.launch), and their test data."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvstore import KVLayout
from kvstore.http_client import KVClient
from kvstore.service.launch import REPO, ServerProcess, launch

__all__ = ["API_KEY", "LAYOUT", "REPO", "kv", "settled", "start_server"]

API_KEY = "test-key-0123456789"
# SmolLM2-shaped chunks at fp16 but 16 tokens: small enough for fast tests, same code paths
LAYOUT = KVLayout(30, 3, 64, torch.float16, 16)


def start_server(
    home: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> ServerProcess:
    """A server with small tiers (64 MiB host, 256 MiB disk) unless `env` says otherwise."""
    return launch(home, {"KVFUSE_HOST_BYTES": "64MiB", "KVFUSE_DISK_BYTES": "256MiB", **(env or {})}, args)


def kv(tokens: int, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(tokens), generator=g).to(layout.dtype)


def settled(client: KVClient, timeout_s: float = 20.0) -> dict:
    """Stats once the write-behind queue is empty (demotions to disk/Redis happen on a worker thread)."""
    deadline = time.monotonic() + timeout_s
    while (stats := client.stats())["pending_writes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats
