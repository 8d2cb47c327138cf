"""LMCache's own RemoteBackend against our lm:// port (run with a Python that has `lmcache` installed).

Usage: python tests/server/lmcache_client.py PORT   -> prints one JSON line of what it checked.
Uses no kvfuse code: LMCache's LocalCPUBackend allocates, its RemoteBackend and lm:// connector talk.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import torch

SHAPE = (2, 30, 256, 192)  # LMCache's KV_2LTD chunk for SmolLM2-135M: [2, layers, tokens, heads*dim]


def main(port: int) -> dict:
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend

    config = LMCacheEngineConfig.from_defaults(
        chunk_size=256,
        local_cpu=True,
        max_local_cpu_size=0.5,
        remote_url=f"lm://127.0.0.1:{port}",
        remote_serde="naive",
    )
    meta = LMCacheMetadata("kvfuse/test-model", 1, 1, 0, 0, torch.float16, (30, 2, 256, 3, 64))
    cpu = LocalCPUBackend(config, meta, dst_device="cpu")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    remote = RemoteBackend(config, meta, loop, cpu, dst_device="cpu")
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(SHAPE, generator=g).half() for _ in range(3)]
    keys = [CacheEngineKey("kvfuse/test-model", 1, 0, 7000 + i, torch.float16) for i in range(3)]
    for key, tensor in zip(keys, data, strict=True):
        obj = cpu.allocate(torch.Size(SHAPE), torch.float16, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(tensor)
        remote.submit_put_task(key, obj).result(timeout=30)
        obj.ref_count_down()
    out = {"contains": [remote.contains(k) for k in keys]}
    out["exact"] = []
    for key, tensor in zip(keys, data, strict=True):
        obj = remote.get_blocking(key)
        out["exact"].append(obj is not None and torch.equal(obj.tensor.view(SHAPE), tensor))
        if obj is not None:
            obj.ref_count_down()
    missing = CacheEngineKey("kvfuse/test-model", 1, 0, 9999, torch.float16)
    out["missing_contains"] = remote.contains(missing)
    out["missing_get"] = remote.get_blocking(missing) is not None
    import lmcache

    out["lmcache_version"] = getattr(lmcache, "__version__", "?")
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))), flush=True)
    os._exit(0)  # LMCache leaves non-daemon threads behind
