"""Start real `kvfuse serve` processes on free loopback ports; test data of the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore import KVLayout
from kvstore.http_client import KVClient

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
# SmolLM2-shaped chunks at fp16 but 16 tokens: small enough for fast tests, same code paths
LAYOUT = KVLayout(30, 3, 64, torch.float16, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    lm_port: int
    proc: subprocess.Popen
    home: Path
    log: Path

    def client(self, api_key: str | None = None) -> KVClient:
        return KVClient(self.url, api_key=api_key)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: the lifespan closes the store
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(home: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> Server:
    """`kvfuse serve` with its store under `home`; waits until /v1/admin/health answers."""
    home.mkdir(parents=True, exist_ok=True)
    port, lm_port = free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVFUSE_") or k == "KVFUSE_DATA"}
    full_env.update({"KVFUSE_HOME": str(home), "KVFUSE_HOST_BYTES": "64MiB", "KVFUSE_DISK_BYTES": "256MiB"})
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--lm-port", str(lm_port)]
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd + (args or []), cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", lm_port, proc, home, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/v1/admin/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not come up in 60 s:\n{log.read_text()[-3000:]}")


def kv(tokens: int, seed: int = 0, layout: KVLayout = LAYOUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(tokens), generator=g).to(layout.dtype)


def settled(client: KVClient, timeout_s: float = 20.0) -> dict:
    """Stats once the write-behind queue is empty (demotions to disk/Redis happen on a worker thread)."""
    deadline = time.monotonic() + timeout_s
    while (stats := client.stats())["pending_writes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats
