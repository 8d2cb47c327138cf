"""Small layouts and entries shared by the kvstore tests."""

from __future__ import annotations

import torch
from redis_keys import glob_escape

from kvstore import Entry, KVLayout

# The default model's layout (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64) with short chunks so the
# tests stay small; 16 tokens of fp16 = 184,320 bytes per chunk.
SMOL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.float16, chunk_tokens=16)
TINY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, chunk_tokens=4)


def tiny_entry(key: str, tokens: int = 4, seed: int = 0) -> Entry:
    """A TINY plain entry with reproducible values (2*2*tokens*2*4 floats = 128*tokens/4 bytes)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(TINY.chunk_shape(tokens), generator=g)
    return Entry.plain(key, TINY, kv, torch.arange(tokens, dtype=torch.int64))


ENTRY_BYTES = tiny_entry("x").nbytes  # tensor + positions bytes of one 4-token TINY entry


def hex_key(i: int) -> str:
    """A key shaped like the store's (32 hex digits)."""
    return f"{i:032x}"


def seed_of(entry: Entry | None) -> int | None:
    """Which seed made this tiny entry (the version a test put), or None."""
    if entry is None:
        return None
    tokens = entry.kv.shape[2]
    return next(s for s in range(100) if torch.equal(tiny_entry(entry.key, tokens, seed=s).kv, entry.kv))


def assert_redis_consistent(tier) -> None:
    """Every data key under the RedisTier's prefix is in its LRU (so it can be evicted) and counted in
    its bytes."""
    import redis

    client = redis.Redis.from_url(tier.url)
    start = tier.prefix + "e:"
    data = {
        k.decode()[len(start) :]: client.strlen(k) for k in client.scan_iter(match=glob_escape(start) + "*")
    }
    assert sorted(data) == sorted(tier.keys())
    assert tier.usage().bytes == sum(data.values())


def start_redis(folder, *extra: str, attempts: int = 5):
    """A private redis-server in `folder` on a free port below 55000 (a cluster node also binds port +
    10000), answering PING: (process, port). Skips without the binary (fails under CI=true); raises
    if it never answers. Every client call here has a timeout: a port taken between our probe and the
    server's bind must not hang the run on a peer that never replies."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    import pytest
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server binary not installed (CI=true: this must not be skipped)")
        pytest.skip("redis-server binary not installed")
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 55000:
            continue
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, cwd=folder)
        client = redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1)
        for _ in range(100):
            if proc.poll() is not None:
                break  # it could not bind: try another port
            try:
                if client.ping():
                    return proc, port
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=10)
    raise RuntimeError(f"no private redis-server answered in {attempts} attempts")
