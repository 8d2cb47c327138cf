"""ServerSettings, and the server's tiers: Redis when configured, Redis down, a restart keeps the disk."""

from __future__ import annotations

import pytest
import torch
from server_helpers import LAYOUT, kv, settled

from kvstore import Entry
from kvstore.service.settings import ServerSettings, parse_size


def test_sizes_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("KVFUSE_HOME", str(tmp_path))
    for name in ("KVFUSE_REDIS_URL", "KVFUSE_API_KEY", "KVFUSE_CONFIG", "KVFUSE_HOST_BYTES"):
        monkeypatch.delenv(name, raising=False)
    assert parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2 * 10**9 and parse_size(7) == 7
    with pytest.raises(ValueError, match="byte size"):
        parse_size("lots")
    s = ServerSettings()
    assert s.host == "127.0.0.1" and s.redis_url is None and s.lm_port is None
    config = s.store_config()
    assert config.disk_path == str(tmp_path / "store") and config.redis_url is None
    assert ServerSettings(disk_bytes=0).store_config().disk_path is None


def test_sources_flags_over_env_over_file(monkeypatch, tmp_path):
    path = tmp_path / "kvfuse.toml"
    path.write_text('host_bytes = "1GiB"\nport = 9000\nredis_url = "redis://127.0.0.1:6379/0"\n')
    monkeypatch.setenv("KVFUSE_CONFIG", str(path))
    monkeypatch.setenv("KVFUSE_PORT", "9100")
    monkeypatch.setenv("KVFUSE_REDIS_URL", "")  # empty switches Redis off
    s = ServerSettings(host_bytes="2GiB")
    assert s.host_bytes == 2 << 30 and s.port == 9100 and s.redis_url is None
    monkeypatch.delenv("KVFUSE_PORT")
    assert ServerSettings().port == 9000
    path.write_text("hots_bytes = 1\n")
    with pytest.raises(ValueError, match="hots_bytes"):
        ServerSettings()
    monkeypatch.setenv("KVFUSE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ValueError, match="does not exist"):
        ServerSettings()


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("KVFUSE_CONFIG", raising=False)
    for bad in ({"port": 70000}, {"host_bytes": -1}, {"write_queue": 0}, {"redis_ttl_s": 0}):
        with pytest.raises(ValueError):
            ServerSettings(**bad)
    assert ServerSettings(api_key="k").public()["api_key"] == "***"


def test_redis_tier_when_configured(redis_url, redis_prefix, fresh_server):
    # redis_prefix before fresh_server: fixtures are torn down in reverse, so the server (which
    # writes its host tier down to Redis as it stops) is gone before the prefix's keys are deleted
    s = fresh_server(
        {
            "KVFUSE_REDIS_URL": redis_url,
            "KVFUSE_REDIS_PREFIX": redis_prefix,
            "KVFUSE_HOST_BYTES": "1MiB",
            "KVFUSE_DISK_BYTES": "0",
        }
    )
    client = s.client()
    entries = [Entry.plain(f"redis-{i}", LAYOUT, kv(16, seed=i)) for i in range(6)]
    client.put_many(entries)
    stats = settled(client)["tiers"]
    assert list(stats) == ["host", "redis"] and stats["redis"]["ok"] and stats["redis"]["entries"] >= 4
    assert client.health()["ok"]
    for entry in entries:  # the first ones were demoted to Redis and come back bit-exact
        assert torch.equal(client.get(entry.key).kv, entry.kv)
    assert client.stats()["tiers"]["redis"]["hits"] >= 1


def test_redis_down_degrades_but_serves(fresh_server):
    s = fresh_server({"KVFUSE_REDIS_URL": "redis://127.0.0.1:1/0", "KVFUSE_REDIS_TIMEOUT_S": "0.2"})
    client = s.client()
    entry = Entry.plain("down-0", LAYOUT, kv(16))
    client.put(entry)
    assert torch.equal(client.get("down-0").kv, entry.kv)
    client.get("down-absent")  # a miss falls through to Redis, which fails
    health = client.health()
    assert health["ok"] is False and health["status"] == "degraded"
    assert health["tiers"]["redis"]["ok"] is False and health["tiers"]["host"]["ok"] is True
    assert client.stats()["tiers"]["redis"]["faults"] >= 1


def test_restart_keeps_entries_and_reads_a_config_file(fresh_server, tmp_path):
    home = tmp_path / "persist"
    config = tmp_path / "server.toml"
    config.write_text('max_body_bytes = "3MiB"\nwrite_queue = 8\n')
    first = fresh_server(args=["--config", str(config)], home=home)
    entries = [Entry.plain(f"restart-{i}", LAYOUT, kv(16, seed=i)) for i in range(3)]
    first.client().put_many(entries)
    settings = first.client().config()["settings"]
    assert settings["max_body_bytes"] == 3 << 20 and settings["write_queue"] == 8
    assert first.stop() == 0  # graceful: memory entries are written to the disk tier
    second = fresh_server(args=["--config", str(config)], home=home)
    for entry in entries:
        assert torch.equal(second.client().get(entry.key).kv, entry.kv)
    assert second.client().stats()["tiers"]["disk"]["hits"] == 3
