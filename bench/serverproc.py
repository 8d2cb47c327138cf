"""A `kvfuse serve` subprocess for the server benchmarks: free ports, readiness wait, RSS, clean stop."""

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

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    url: str
    lm_port: int
    proc: subprocess.Popen

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(home: Path, env: dict[str, str]) -> ServerProc:
    """Start the server with its files under `home` and settings from `env` (KVFUSE_*)."""
    port, lm_port = free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVFUSE_")}
    full_env.update({"KVFUSE_HOME": str(home), "KVFUSE_LOG_LEVEL": "warning", **env})
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--lm-port", str(lm_port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = ServerProc(f"http://127.0.0.1:{port}", lm_port, proc)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(server.url + "/v1/admin/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("the server did not come up in 120 s")
