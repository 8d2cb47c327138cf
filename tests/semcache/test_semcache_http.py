"""The REST routes through the real server (server.py under uvicorn), the CLI as a subprocess, and the LangChain adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-123"
Q = "What is cognitive dissonance?"


def _env(redis_url: str, prefix: str, folder: Path, shared_data: Path) -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        KVFUSE_API_KEY=KEY,
        KVFUSE_SEMCACHE_REDIS_URL=redis_url,
        KVFUSE_SEMCACHE_REDIS_PREFIX=prefix,
        KVFUSE_SEMCACHE_FOLDER=str(folder),
        KVFUSE_SEMCACHE_CLASSIFIER_EXAMPLES=str(shared_data / "semcache" / "domain_questions_dev.json"),
        KVFUSE_SEMCACHE_MAX_BODY_BYTES="65536",
        KVFUSE_HOME=str(folder / "home"),
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture(scope="module")
def env(redis_url, tmp_path_factory, shared_data):
    """One Redis prefix and folder for this module's server and CLI processes, cleaned up afterwards."""
    import redis

    prefix = f"kvfuse-test:semcache-http:{os.getpid()}:{time.monotonic_ns()}:"
    yield _env(redis_url, prefix, tmp_path_factory.mktemp("semcache-http"), shared_data)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)


@pytest.fixture(scope="module")
def server(env):
    """`kvfuse serve` (server.py) as a subprocess with this module's semcache settings."""
    from kvstore.service.launch import launch

    semcache_env = {k: v for k, v in env.items() if k.startswith("KVFUSE_") or k == "HF_HUB_OFFLINE"}
    proc = launch(Path(env["KVFUSE_HOME"]), env=semcache_env)
    yield proc.url
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


def test_rest_routes(server):
    h = {"X-API-Key": KEY}
    with httpx.Client(base_url=server + "/v1/semcache", headers=h, timeout=120) as c:
        r = c.post(
            "/insert",
            json={
                "question": Q,
                "answer": "A mental conflict",
                "tenant": "acme",
                "metadata": {"source": "test"},
            },
        )
        assert r.status_code == 200 and r.json()["stored"], r.text
        hit = c.post(
            "/lookup", json={"question": "Can you explain cognitive dissonance?", "tenant": "acme"}
        ).json()
        assert hit["hit"] and hit["answer"] == "A mental conflict" and hit["metadata"] == {"source": "test"}
        other = c.post("/lookup", json={"question": Q, "tenant": "globex"}).json()
        assert not other["hit"] and other["answer"] is None
        cats = c.get("/categories").json()
        assert cats["default"] == "default" and any(x["name"] == "health" for x in cats["categories"])
        upd = c.put("/categories/psychology", json={"threshold": 0.99})
        assert upd.status_code == 200 and upd.json()["threshold"] == 0.99
        assert not c.post(
            "/lookup", json={"question": "Can you explain cognitive dissonance?", "tenant": "acme"}
        ).json()["hit"]
        assert c.post("/load", json={"model": "default", "load": 0.9}).json()["relaxed"] is True
        stats = c.get("/stats").json()
        assert stats["metrics"]["psychology"]["hits"] == 1 and stats["entries"]["psychology"]["entries"] == 1
        assert c.post("/invalidate", json={"tenant": "acme", "question": Q}).json() == {"removed": 1}
        assert not c.post("/lookup", json={"question": Q, "tenant": "acme"}).json()["hit"]
        c.put("/categories/psychology", json={"threshold": 0.88})  # the module shares one server
        c.post("/load", json={"model": "default", "load": 0.0})


def test_rest_errors_and_auth(server):
    h = {"X-API-Key": KEY}
    url = server + "/v1/semcache"
    body = {"question": Q, "tenant": "acme"}
    assert httpx.post(url + "/lookup", json=body).status_code == 401
    assert httpx.post(url + "/lookup", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/lookup", json=body, headers=bearer, timeout=120).status_code == 200
    cases = [
        ({"question": "", "tenant": "acme"}, 422, "empty"),
        ({"question": 42, "tenant": "acme"}, 422, "string"),
        ({"question": "x" * 3000, "tenant": "acme"}, 422, "limit is 2048"),
        ({"question": Q, "tenant": "acme", "category": "nope"}, 422, "unknown category"),
        ({"question": Q, "tenant": "acme", "colour": "red"}, 422, "colour"),
        ({"question": Q}, 422, "tenant"),
    ]
    for payload, status, text in cases:
        r = httpx.post(url + "/lookup", json=payload, headers=h, timeout=60)
        assert r.status_code == status and text in r.text, (payload, r.status_code, r.text)
    huge = {"question": Q, "answer": "y" * 100_000, "tenant": "acme"}
    r = httpx.post(url + "/insert", json=huge, headers=h, timeout=60)
    assert r.status_code == 413 and "limit" in r.text
    r = httpx.post(url + "/lookup", content=b"{not json", headers={**h, "content-type": "application/json"})
    assert r.status_code == 422
    r = httpx.put(url + "/categories/health", json={"threshold": 7}, headers=h)
    assert r.status_code == 422 and "threshold" in r.text


def _send_raw(url: str, head: str, parts: list[bytes]) -> tuple[bytes, float]:
    """Send a request's head and only these body parts (never the rest), then read the reply: a server
    that waits for the whole body never answers (socket timeout)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(head.encode())
        for part in parts:
            sock.sendall(part)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            pass
        return reply, time.monotonic() - t0


def test_oversized_body_refused_before_it_is_read(server):
    head = (
        "POST /v1/semcache/lookup HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
        "Content-Type: application/json\r\n{length}\r\n"
    )
    # 24 MB declared (under the server's global limit, over semcache's 64 KiB here), 20 bytes sent.
    declared = head.format(key=KEY, length="Content-Length: 24000000\r\n")
    reply, took = _send_raw(server, declared, [b'{"question": "why",'])
    assert reply.startswith(b"HTTP/1.1 413") and took < 5, (reply[:200], took)
    # Chunked: 80 KiB sent in 16 KiB chunks, no final chunk; refused once it crossed 64 KiB.
    chunked = head.format(key=KEY, length="Transfer-Encoding: chunked\r\n")
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    reply, took = _send_raw(server, chunked, [chunk] * 5)
    assert reply.startswith(b"HTTP/1.1 413") and took < 5, (reply[:200], took)
    # Under the limit, chunked or not, a body is read and served as before.
    small = json.dumps({"question": Q, "tenant": "acme"}).encode()
    body = hex(len(small))[2:].encode() + b"\r\n" + small + b"\r\n0\r\n\r\n"
    reply, _ = _send_raw(server, chunked, [body])
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_body_limit_for_the_servers_middleware():
    from fastapi import FastAPI

    from semcache.api import body_limit
    from semcache.settings import SemcacheSettings

    app = FastAPI()
    app.state.semcache_settings = SemcacheSettings(max_body_bytes=1000)
    assert body_limit(app, "/v1/semcache/lookup") == 1000
    assert body_limit(app, "/v1/kv/put") is None and body_limit(app, "/v1/semcacheX") is None


def test_category_numbers_must_be_finite_over_http(server):
    h = {"X-API-Key": KEY, "content-type": "application/json"}
    url = server + "/v1/semcache"
    # Python's JSON parser reads these tokens; they used to pass as a never-expiring TTL.
    for raw, field in [
        (b'{"ttl_s":Infinity}', "ttl_s"),
        (b'{"ttl_s":NaN}', "ttl_s"),
        (b'{"threshold":NaN}', "threshold"),
        (b'{"ttl_s":1e400}', "ttl_s"),
    ]:
        r = httpx.put(url + "/categories/zz", content=raw, headers=h, timeout=60)
        assert r.status_code == 422 and field in r.text and "finite" in r.text, (raw, r.status_code, r.text)
    r = httpx.put(url + "/categories/zz", json={"ttl_s": 91 * 86400}, headers=h, timeout=60)
    assert r.status_code == 422 and "max_ttl_s" in r.text, r.text
    r = httpx.post(
        url + "/insert",
        content=b'{"question":"q","answer":"a","tenant":"t","ttl_s":Infinity}',
        headers=h,
        timeout=60,
    )
    assert r.status_code == 422 and "ttl_s" in r.text, r.text
    names = [c["name"] for c in httpx.get(url + "/categories", headers=h, timeout=60).json()["categories"]]
    assert "zz" not in names


def _cli(env: dict, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "semcache", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_cli_remote_and_local(env, server):
    ins = _cli(env, "insert", Q, "A mental conflict", "--tenant", "cli", "--url", server)
    assert ins["stored"] and ins["category"] == "psychology"
    # Another process, local mode on the same Redis prefix: it rebuilds its index from Redis at start.
    res = _cli(env, "lookup", "Define cognitive dissonance", "--tenant", "cli")
    assert res["hit"] and res["answer"] == "A mental conflict"
    bad = subprocess.run(
        [sys.executable, "-m", "engine.cli", "semcache", "lookup", "", "--tenant", "cli"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "empty" in bad.stderr


def test_langchain_cache_adapter(make_cache):
    from langchain_core.globals import set_llm_cache
    from langchain_core.language_models.fake import FakeListLLM

    from semcache.langchain import KvfuseSemanticCache

    cache = make_cache()
    set_llm_cache(KvfuseSemanticCache(cache, tenant="lc"))
    try:
        llm = FakeListLLM(responses=["first answer", "second answer", "third answer"])
        assert llm.invoke(Q) == "first answer"
        # A paraphrase is served from the cache: the fake LLM would have said "second answer".
        assert llm.invoke("Can you explain cognitive dissonance?") == "first answer"
        other = FakeListLLM(responses=["other config"], cache=KvfuseSemanticCache(cache, tenant="lc2"))
        assert other.invoke(Q) == "other config"  # another tenant: no answer crosses over

        def stored(tenant):
            return sum(cache.ledger.usage(s)[0] for s in cache.ledger.scopes() if s.tenant == tenant)

        assert stored("lc") == 1 and stored("lc2") == 1
        KvfuseSemanticCache(cache, tenant="lc").clear()
        assert stored("lc") == 0 and stored("lc2") == 1
    finally:
        set_llm_cache(None)
