"""Every /v1/admin call, /metrics, /docs and the `kvfuse` admin subcommands against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import torch
from server_helpers import LAYOUT, REPO, kv, settled, start_server

from engine.cli import main
from kvstore import Entry, Namespace
from kvstore.remote import RemoteConnector


def _fill(client, prefix: str, n: int) -> list[Entry]:
    entries = [Entry.plain(f"{prefix}-{i}", LAYOUT, kv(16, seed=i), torch.arange(16)) for i in range(n)]
    client.put_many(entries)
    return entries


def test_stats_and_health(server):
    client = server.client()
    _fill(client, "stats", 2)
    client.get("stats-0")
    client.get("stats-absent")
    stats = client.stats()
    host = stats["tiers"]["host"]
    assert set(stats["tiers"]) == {"host", "disk"}
    assert host["entries"] >= 2 and host["bytes"] >= 2 * LAYOUT.chunk_nbytes(16)
    assert host["capacity_bytes"] == 64 << 20 and host["hits"] >= 1 and host["misses"] >= 1
    assert stats["server"]["lm_port"] == server.lm_port and stats["server"]["uptime_s"] > 0
    # startup's long-lived objects (imports, store) are out of the collector's full passes
    heap = stats["server"]["heap"]
    assert heap["frozen_objects"] > 100_000 and len(heap["collections"]) == 3
    health = client.health()
    assert health["ok"] and health["status"] == "ok"
    assert health["disk_writable"]["ok"] and health["queue_depth"] >= 0
    assert health["lm"]["port"] == server.lm_port


def test_list_is_paged_and_inspect_moves_nothing(server):
    client = server.client()
    _fill(client, "page", 5)
    first = client.entries(offset=0, limit=2, prefix="page-")
    second = client.entries(offset=2, limit=10, prefix="page-")
    assert first["total"] == 5 and len(first["entries"]) == 2 and len(second["entries"]) == 3
    keys = [e["key"] for e in first["entries"] + second["entries"]]
    assert sorted(keys) == [f"page-{i}" for i in range(5)]
    assert all(e["tiers"]["host"] > 0 and e["pinned"] is False for e in first["entries"])
    hits = client.stats()["tiers"]["host"]["hits"]
    info = client.inspect("page-3")
    assert info["tensors"]["kv"]["shape"] == [30, 2, 16, 3, 64] and info["num_tokens"] == 16
    assert info["positions"] == {"first": 0, "last": 15, "count": 16}
    assert info["layout"]["chunk_tokens"] == 16
    assert client.stats()["tiers"]["host"]["hits"] == hits  # inspecting is not a hit
    client.put(Entry.plain("page-meta", LAYOUT, kv(4), a=[b"\xff\xfe", {"b": b"\x01"}], n=3))
    assert client.inspect("page-meta")["meta"] == {"a": ["fffe", {"b": "01"}], "n": 3}  # bytes at any depth
    with pytest.raises(KeyError):
        client.inspect("page-absent")
    with pytest.raises(ValueError, match="limit"):
        client.entries(limit=5000)


def test_lookup_by_keys_and_by_tokens(server):
    client = server.client()
    namespace = Namespace("admin-model", LAYOUT, "admin")
    tokens = list(range(500, 540))
    RemoteConnector(server.url, namespace).store(tokens, kv(40))
    keys = namespace.chunk_keys(tokens)
    assert client.lookup(keys) == 3
    assert client.lookup([keys[0], "lookup-absent", keys[2]]) == 1
    ns = {"model_id": "admin-model", "layout": LAYOUT.to_dict(), "salt": "admin"}
    assert client.lookup_tokens(ns, tokens) == 40
    assert client.lookup_tokens(ns, tokens[:20] + [1, 2, 3]) == 16
    assert client.lookup_tokens({**ns, "salt": "other"}, tokens) == 0


def test_evict_by_key_and_by_prefix(server):
    client = server.client()
    _fill(client, "evict", 4)
    assert client.evict("evict-0") == 1 and client.get("evict-0") is None
    assert client.evict("evict-0") == 0
    assert client.evict(prefix="evict-") == 3
    assert client.entries(prefix="evict-")["total"] == 0
    with pytest.raises(ValueError, match="exactly one"):
        client.json_call("POST", "/v1/admin/evict", {"key": "a", "prefix": "b"})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A server these tests may clear and reconfigure: 1 MiB of host RAM (two 360 KiB entries) + disk."""
    s = start_server(tmp_path_factory.mktemp("server-admin"), {"KVFUSE_HOST_BYTES": "1MiB"})
    yield s
    s.stop()


def test_pin_keeps_an_entry_in_its_tier(scratch):
    client = scratch.client()
    client.clear()
    _fill(client, "pinned", 1)
    client.pin("pinned-0")
    assert client.inspect("pinned-0")["pinned"] is True
    _fill(client, "filler", 6)
    assert "host" in client.inspect("pinned-0")["tiers"]  # the fillers were demoted around it
    assert "host" not in client.inspect("filler-0")["tiers"]
    assert client.stats()["tiers"]["host"]["bytes"] <= 1 << 20 and client.stats()["pinned"] == 1
    client.unpin("pinned-0")
    _fill(client, "more", 3)
    assert "host" not in client.inspect("pinned-0")["tiers"]
    assert client.get("pinned-0") is not None  # demoted, not lost
    with pytest.raises(KeyError):
        client.pin("never-stored")


def test_clear_one_tier_or_everything(scratch):
    client = scratch.client()
    client.clear()
    entries = _fill(client, "clear", 8)  # 2 fit in host, the rest are demoted to disk
    tiers = settled(client)["tiers"]
    assert tiers["disk"]["entries"] >= 6
    out = client.clear("host")
    assert out == {"cleared": "host", "removed": tiers["host"]["entries"]}
    assert client.stats()["tiers"]["host"]["entries"] == 0
    assert client.get(entries[0].key) is not None  # demoted copies on disk remain
    with pytest.raises(ValueError, match="unknown tier"):
        client.clear("gpu")
    assert client.clear()["cleared"] == "all"
    assert client.entries()["total"] == 0 and client.get(entries[0].key) is None


def test_config_read_and_live_write(scratch):
    client = scratch.client()
    config = client.config()
    assert config["settings"]["host"] == "127.0.0.1" and config["settings"]["api_key"] is None
    assert config["settings"]["disk_path"] == str(scratch.home / "store")
    assert set(config["live"]) == {"max_body_bytes", "write_through", "redis_retry_s"}
    try:
        out = client.set_config(max_body_bytes="2MiB", write_through=True)
        assert out["settings"]["max_body_bytes"] == 2 << 20 and out["settings"]["write_through"] is True
        with pytest.raises(ValueError, match="413"):  # the new limit applies at once
            client.put(Entry.plain("too-big", LAYOUT, kv(200)))
        with pytest.raises(ValueError, match="can change only"):
            client.set_config(host_bytes=1)
        with pytest.raises(ValueError):
            client.set_config(max_body_bytes="lots")
        assert client.config()["settings"]["max_body_bytes"] == 2 << 20  # a failed change changes nothing
        with pytest.raises(ValueError, match="max_body_bytes"):
            client.set_config(max_body_bytes=0)  # would lock out every later PATCH (413)
    finally:
        client.set_config(**{k: config["settings"][k] for k in ("max_body_bytes", "write_through")})


def test_metrics_are_prometheus_text(server):
    client = server.client()
    _fill(client, "metrics", 1)
    client.get("metrics-0")
    with urllib.request.urlopen(server.url + "/metrics") as resp:
        text = resp.read().decode()
        assert resp.headers["content-type"].startswith("text/plain")
    for name in (
        "kvfuse_tier_hits_total",
        "kvfuse_tier_misses_total",
        "kvfuse_tier_evictions_total",
        "kvfuse_tier_bytes",
        "kvfuse_write_queue_depth",
        "kvfuse_http_request_seconds_bucket",
    ):
        assert name in text, name
    hits = [line for line in text.splitlines() if line.startswith('kvfuse_tier_hits_total{tier="host"}')]
    assert float(hits[0].split()[-1]) >= 1
    assert 'route="/v1/kv/entries/{key}"' in text  # labelled by route template, not by raw path


def test_openapi_docs(server):
    with urllib.request.urlopen(server.url + "/openapi.json") as resp:
        spec = json.load(resp)
    assert {"/v1/kv/lookup", "/v1/kv/store", "/v1/admin/stats", "/v1/admin/evict", "/metrics"} <= set(
        spec["paths"]
    )
    with urllib.request.urlopen(server.url + "/docs") as resp:
        assert b"swagger" in resp.read().lower()


def _kvfuse(capsys, *args: str, url: str) -> tuple[int, str, str]:
    """The `kvfuse` command in this process (no second torch import); see the subprocess test below."""
    code = main([*args, "--url", url])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_admin_subcommands(scratch, capsys):
    client = scratch.client()
    client.clear()
    _fill(client, "cli", 3)
    code, out, _ = _kvfuse(capsys, "stats", url=scratch.url)
    assert code == 0 and json.loads(out)["tiers"]["disk"]["entries"] >= 1
    listing = json.loads(_kvfuse(capsys, "ls", "--prefix", "cli-", "--limit", "2", url=scratch.url)[1])
    assert listing["total"] == 3 and len(listing["entries"]) == 2
    assert json.loads(_kvfuse(capsys, "pin", "cli-1", url=scratch.url)[1])["pinned"] is True
    assert client.inspect("cli-1")["pinned"] is True
    assert json.loads(_kvfuse(capsys, "unpin", "cli-1", url=scratch.url)[1])["pinned"] is False
    assert json.loads(_kvfuse(capsys, "inspect", "cli-2", url=scratch.url)[1])["num_tokens"] == 16
    assert json.loads(_kvfuse(capsys, "evict", "cli-0", url=scratch.url)[1]) == {"removed": 1}
    code, _, err = _kvfuse(capsys, "pin", "cli-0", url=scratch.url)
    assert code == 1 and "not in the store" in err
    code, _, err = _kvfuse(capsys, "clear", url=scratch.url)
    assert code == 2 and "--all" in err
    assert json.loads(_kvfuse(capsys, "clear", "--all", url=scratch.url)[1])["removed"] == 2
    code, out, _ = _kvfuse(capsys, "config", "--set", "write_through=false", url=scratch.url)
    assert code == 0 and json.loads(out)["settings"]["write_through"] is False
    code, _, err = _kvfuse(capsys, "stats", url="http://127.0.0.1:9")
    assert code == 2 and "error" in err


def test_console_command_reaches_the_server(scratch):
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "health", "--url", scratch.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "ok"
