"""Start `kvfuse serve` as a subprocess on free loopback ports and wait until it answers (tests, benches,
tools that want a private server). `stop()` shuts it down gracefully (the store is closed and persisted).
"""

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

from kvstore.http_client import KVClient

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    lm_port: int
    proc: subprocess.Popen
    home: Path
    log: Path

    def client(self, api_key: str | None = None) -> KVClient:
        return KVClient(self.url, api_key=api_key)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc; 0 elsewhere)."""
        status = Path(f"/proc/{self.proc.pid}/status")
        for line in status.read_text().splitlines() if status.exists() else []:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGINT (graceful shutdown), then kill after `timeout_s`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(
    home: Path, env: dict[str, str] | None = None, args: list[str] | None = None, timeout_s: float = 120.0
) -> ServerProcess:
    """`kvfuse serve` with KVFUSE_HOME=`home` (log in home/server.log), lm:// on, settings from `env`.

    KVFUSE_* variables of the calling environment are not passed on (except KVFUSE_DATA), so the server
    runs with exactly the settings given.
    """
    home.mkdir(parents=True, exist_ok=True)
    port, lm_port = free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVFUSE_") or k == "KVFUSE_DATA"}
    full_env.update({"KVFUSE_HOME": str(home), **(env or {})})
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--lm-port", str(lm_port)]
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd + (args or []), cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", lm_port, proc, home, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvfuse serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/v1/admin/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"kvfuse serve did not answer in {timeout_s} s:\n{log.read_text()[-3000:]}")
