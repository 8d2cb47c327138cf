"""Key prefixes for tests sharing one Redis: built so that a MATCH pattern finds exactly their keys."""

from __future__ import annotations

import hashlib
import os
import re
import time


def redis_test_prefix(nodeid: str) -> str:
    """`kvfuse-test:<readable name>:<hash of the node id>:<pid>:<ns>:`, free of Redis glob syntax: a
    parametrized test's name holds `[` and `]` (a character class in SCAN MATCH), so its cleanup
    pattern matched none of its keys and they stayed behind."""
    name = nodeid.rpartition("::")[2]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    digest = hashlib.blake2b(nodeid.encode(), digest_size=6).hexdigest()  # same name, other module
    return f"kvfuse-test:{readable}:{digest}:{os.getpid()}:{time.monotonic_ns()}:"


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\^])", r"\\\1", text)


def delete_prefix(client, prefix: str) -> None:
    for key in client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
        client.delete(key)


def keys_under(client, prefix: str) -> list[bytes]:
    """Keys starting with `prefix`, found without a pattern built from it (so a bad escape cannot
    hide them): every test key, filtered here."""
    start = prefix.encode()
    return [k for k in client.scan_iter(match="kvfuse-test:*", count=1000) if k.startswith(start)]
