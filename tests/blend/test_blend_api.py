"""`/v1/rag/...` through a real `kvfuse serve` process: API key, ingest, query, tenants, bad input, restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from blend_cases import PASSAGES

REPO = Path(__file__).resolve().parents[2]
KEY = "rag-test-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KVFUSE_") or k in ("KVFUSE_HOME", "KVFUSE_DATA")
        }
        # the model's weight cache stays in the usual $KVFUSE_HOME; the store and catalogs are the test's
        env.update({"KVFUSE_API_KEY": KEY, "KVFUSE_RAG_DIR": str(root / "rag"), "OMP_NUM_THREADS": "1"})
        cmd = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--port",
            str(self.port),
            "--host-bytes",
            "256MiB",
            "--disk-path",
            str(root / "store"),
            "--disk-bytes",
            "1GiB",
            "--log-level",
            "warning",
        ]
        self.log = root / f"server-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/admin/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up: {self.log.read_text()[-2000:]}")

    def post(self, path: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        if key:
            req.add_header("X-API-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


DOCS = [{"id": "paris", "title": "Eiffel Tower", "text": PASSAGES[0]}, {"id": "japan", "text": PASSAGES[1]}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rag-server")


def test_rag_routes_through_a_real_server(root):
    server = Server(root)
    try:
        status, body = server.post("/v1/rag/documents", {"documents": DOCS}, key=None)
        assert status == 401
        status, body = server.post("/v1/rag/documents", {"documents": DOCS})
        assert status == 200, body
        assert body["computed"] == 2 and [p["doc_id"] for p in body["passages"]] == ["paris", "japan"]
        ids = [p["id"] for p in body["passages"]]

        status, answer = server.post(
            "/v1/rag/query", {"question": "Who designed the Eiffel Tower?", "top_k": 1, "max_new_tokens": 8}
        )
        assert status == 200, answer
        assert answer["passages"] == [ids[0]] and answer["reused_passages"] == 1
        assert answer["method"] == "cacheblend" and answer["text"] and answer["ttft_s"] > 0

        status, full = server.post(
            "/v1/rag/query",
            {
                "question": "How tall is Mount Fuji?",
                "passage_ids": ids,
                "method": "full_prefill",
                "max_new_tokens": 8,
            },
        )
        assert status == 200 and full["method"] == "full_prefill" and full["prompt_tokens"] > 100

        # tenants never see each other's passages
        status, other = server.post(
            "/v1/rag/query", {"question": "Who?", "passage_ids": ids[:1], "tenant": "b"}
        )
        assert status == 400 and "unknown passage id" in other["detail"]

        status, err = server.post(
            "/v1/rag/query", {"question": "Who?", "passage_ids": ids, "method": "magic"}
        )
        assert status == 400 and "magic" in err["detail"]
        status, err = server.post("/v1/rag/query", {"question": "Who?", "top_k": 1, "colour": "red"})
        assert status == 422
        status, err = server.post("/v1/rag/documents", {"documents": [{"title": "no text"}]})
        assert status == 422
        status, err = server.post("/v1/rag/query", {"question": "why " * 8300, "passage_ids": ids[:1]})
        assert status == 400 and "question is" in err["detail"]
        # a tenant is a folder name under the RAG root: never a way out of it
        for tenant in ("..", ".", ".hidden", "a/b"):
            status, err = server.post("/v1/rag/documents", {"documents": ["x y z"], "tenant": tenant})
            assert status == 422, (tenant, status, err)
        assert sorted(p.name for p in root.iterdir() if p.suffix == ".jsonl") == []
    finally:
        server.stop()

    again = Server(root)  # the catalog and the passages' KV (disk tier) survive a restart
    try:
        status, answer = again.post(
            "/v1/rag/query", {"question": "Who designed the Eiffel Tower?", "top_k": 1, "max_new_tokens": 4}
        )
        assert status == 200, answer
        assert answer["passages"] == [ids[0]]
        assert answer["reused_passages"] == 1 and answer["computed_passages"] == 0
    finally:
        again.stop()
