"""LMCache's own LocalCPUBackend and LocalDiskBackend on kvfuse's bench chunks (run in LMCache's venv).

Usage: <lmcache venv>/bin/python bench/lmcache_backends.py --chunks N --dir DIR
Prints one JSON line of GiB/s. Called by bench/kvstore.py; kept apart because lmcache lives in its own
venv (it pulls ~2 GB of dependencies the project does not need).

What is timed (the same as kvfuse's side of bench/kvstore.py; best of 3 rounds each):
- put: allocate a memory object from the CPU backend's pre-allocated pool, copy the chunk into it,
  submit_put_task (fresh keys each round, so no round is a no-op re-put);
- get: get_blocking returns a ref-counted memory object in the pool (no copy); ref_count_down;
- get_copy: the same, plus copy_() into a caller's buffer that was used before;
- disk put: submit_put_task until every key is on disk; disk get: page cache dropped, get_blocking
  reads each file into a memory object from the CPU pool, with buffered reads (the default) and with
  LMCache's O_DIRECT mode (use_odirect).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time

import torch

SHAPE = (30, 2, 256, 3, 64)  # SmolLM2-135M, 256 tokens, fp16: 5.6 MiB


ROUNDS = 3


def _config(disk_dir: str, chunks: int):
    from lmcache.v1.config import LMCacheEngineConfig

    gib = chunks * torch.Size(SHAPE).numel() * 2 / 2**30
    return LMCacheEngineConfig.from_defaults(
        chunk_size=256,
        local_cpu=True,
        max_local_cpu_size=gib * (ROUNDS + 2) + 0.5,  # every put round under its own keys, plus disk reads
        local_disk=disk_dir,
        max_local_disk_size=gib * 2 + 0.5,
    )


def _metadata():
    from lmcache.v1.metadata import LMCacheMetadata

    return LMCacheMetadata("bench", 1, 1, 0, 0, torch.float16, SHAPE)


def _key(i: int):
    from lmcache.utils import CacheEngineKey

    return CacheEngineKey("bench", 1, 0, 1000 + i, torch.float16)


def _fill(backend, src: torch.Tensor):
    from lmcache.v1.memory_management import MemoryFormat

    obj = backend.allocate(torch.Size(SHAPE), torch.float16, MemoryFormat.KV_2LTD)
    obj.tensor.copy_(src)
    return obj


def _put_round(cpu, data: list[torch.Tensor], base: int) -> float:
    t0 = time.perf_counter()
    for i, t in enumerate(data):
        obj = _fill(cpu, t)
        cpu.submit_put_task(_key(base + i), obj)
        obj.ref_count_down()
    return time.perf_counter() - t0


def _get_round(cpu, n: int, dst: list[torch.Tensor] | None) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        obj = cpu.get_blocking(_key(i))
        if dst is not None:
            dst[i].copy_(obj.tensor.view(SHAPE))
        obj.ref_count_down()
    return time.perf_counter() - t0


def bench_cpu(cpu, data: list[torch.Tensor]) -> dict[str, float]:
    nbytes = sum(t.numel() * 2 for t in data)
    put = min(_put_round(cpu, data, base=r * 10_000) for r in range(ROUNDS))
    dst = [torch.zeros_like(t) for t in data]
    get = min(_get_round(cpu, len(data), None) for _ in range(ROUNDS))
    get_copy = min(_get_round(cpu, len(data), dst) for _ in range(ROUNDS))
    assert torch.equal(dst[-1], data[-1])
    return {
        "lmcache_cpu_put_gibs": nbytes / put / 2**30,
        "lmcache_cpu_get_gibs": nbytes / get / 2**30,
        "lmcache_cpu_get_copy_gibs": nbytes / get_copy / 2**30,
    }


def bench_disk(disk, cpu, data: list[torch.Tensor]) -> dict[str, float]:
    nbytes = sum(t.numel() * 2 for t in data)
    objs = [_fill(cpu, t) for t in data]
    t0 = time.perf_counter()
    for i, obj in enumerate(objs):
        disk.submit_put_task(_key(900_000 + i), obj)
    while not all(disk.contains(_key(900_000 + i)) for i in range(len(data))):
        time.sleep(0.0005)
    put = time.perf_counter() - t0
    for obj in objs:
        obj.ref_count_down()
    get = _disk_get(disk, len(data))
    disk.use_odirect = True  # LMCache's own O_DIRECT read mode (extra_config use_odirect); chunk files
    get_direct = _disk_get(disk, len(data))  # are 4 KiB multiples, so it applies to every read
    return {
        "lmcache_disk_put_gibs": nbytes / put / 2**30,
        "lmcache_disk_get_gibs": nbytes / get / 2**30,
        "lmcache_disk_get_odirect_gibs": nbytes / get_direct / 2**30,
    }


def _disk_get(disk, n: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        _drop_cache(disk.path)
        t0 = time.perf_counter()
        for i in range(n):
            obj = disk.get_blocking(_key(900_000 + i))
            obj.ref_count_down()
        best = min(best, time.perf_counter() - t0)
    return best


def _drop_cache(folder: str) -> None:
    """Evict the folder's files from the page cache (POSIX_FADV_DONTNEED works without root); written
    back first, as dirty pages of fresh files would stay cached (same as bench/kvstore.py)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    config, meta = _config(args.dir, args.chunks), _metadata()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(SHAPE, generator=g).half() for _ in range(args.chunks)]
    cpu = LocalCPUBackend(config, meta, dst_device="cpu")
    out = bench_cpu(cpu, data)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    disk = LocalDiskBackend(config, loop, cpu, dst_device="cpu", metadata=meta)
    out.update(bench_disk(disk, cpu, data))
    import lmcache

    out["lmcache_version"] = getattr(lmcache, "__version__", "?")
    print(json.dumps(out))
    os._exit(0)  # LMCache leaves non-daemon threads behind


if __name__ == "__main__":
    main()
