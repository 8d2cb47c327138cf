"""Bounded load test of a real `kvfuse serve`: concurrent clients mixing put/get/lookup on loopback.

    .venv/bin/python bench/server_load.py --quick        # 8 clients, 10 s
    .venv/bin/python bench/server_load.py                # 32 clients, 60 s
    .venv/bin/python bench/server_load.py --seconds 120

Clients are threads spread over worker processes (so the client side is not one GIL), each with its own
keep-alive connection. Each op is a put (40%), a get (40%) or a lookup (20%) of 64-token SmolLM2 fp16
chunks (1.4 MiB) over a key space four times the host tier, so evictions and disk demotions happen all
the time. Every get is verified: the entry's checksum (kvstore.format) and the xxh3 of its bytes against
what this client put under that key (a miss is allowed: the key may have been evicted; wrong bytes are an
error). The server's resident memory is sampled every 0.5 s and must stay within
`host_bytes + overhead`, the overhead being the process at rest, the request bodies in flight (2 buffers
per client) and the entries queued for the disk tier (the write-behind queue, 64 entries). Prints one JSON line: ops/s, MiB/s, p50/p99 latency per op, errors, memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import xxhash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvstore import Entry, KVLayout  # noqa: E402
from kvstore.http_client import KVClient  # noqa: E402
from kvstore.service.launch import ServerProcess, launch  # noqa: E402

LAYOUT = KVLayout(30, 3, 64, torch.float16, 64)
TOKENS = 64
MIB = 2**20


def _chunk(key: str) -> torch.Tensor:
    """The chunk a key always holds (derived from the key, so any client can check any get)."""
    g = torch.Generator().manual_seed(xxhash.xxh3_64_intdigest(key.encode()) & 0x7FFFFFFF)
    return torch.randint(
        -(2**15), 2**15 - 1, LAYOUT.chunk_shape(TOKENS), generator=g, dtype=torch.int16
    ).view(torch.float16)


def _client_loop(url: str, seed: int, deadline: float, keys: int, out: list) -> None:
    rng = random.Random(seed)
    client = KVClient(url, timeout_s=120)
    expected: dict[str, int] = {}
    stats = {
        "put": [],
        "get": [],
        "lookup": [],
        "errors": 0,
        "misses": 0,
        "hits": 0,
        "bytes": 0,
        "messages": [],
    }
    nbytes = LAYOUT.chunk_nbytes(TOKENS)
    while time.time() < deadline:
        key = f"load-{rng.randrange(keys):06d}"
        op = rng.choices(("put", "get", "lookup"), (4, 4, 2))[0]
        t0 = time.perf_counter()
        try:
            if op == "put":
                data = _chunk(key)
                client.put(Entry.plain(key, LAYOUT, data))
                expected[key] = xxhash.xxh3_64_intdigest(data.view(torch.uint8).numpy())
                stats["bytes"] += nbytes
            elif op == "get":
                entry = client.get(key)  # decode() verified the checksum and the key
                if entry is None:
                    stats["misses"] += 1
                else:
                    stats["hits"] += 1
                    stats["bytes"] += nbytes
                    digest = xxhash.xxh3_64_intdigest(entry.kv.view(torch.uint8).numpy())
                    want = expected.get(key, xxhash.xxh3_64_intdigest(_chunk(key).view(torch.uint8).numpy()))
                    if digest != want:
                        raise ValueError(f"get {key}: wrong bytes")
            else:
                client.lookup([key, f"load-{rng.randrange(keys):06d}"])
        except Exception as e:  # counted, reported: the goal is zero
            stats["errors"] += 1
            if len(stats["messages"]) < 5:
                stats["messages"].append(f"{op} {key}: {type(e).__name__}: {e}"[:300])
            continue
        stats[op].append(time.perf_counter() - t0)
    out.append(stats)


def _worker(url: str, first_seed: int, threads: int, seconds: float, keys: int, queue: mp.Queue, go) -> None:
    torch.set_num_threads(1)
    queue.put("ready")  # imports are done: the clock starts only when every worker can run
    go.wait()
    deadline = time.time() + seconds
    results: list = []
    pool = [
        threading.Thread(target=_client_loop, args=(url, first_seed + i, deadline, keys, results))
        for i in range(threads)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put(results)


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))] * 1e3 if s else float("nan")


def _sample_rss(server: ServerProcess, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss_bytes())
        stop.wait(0.5)


def _summarize(all_stats: list[dict], seconds: float) -> dict:
    merged = {op: [x for s in all_stats for x in s[op]] for op in ("put", "get", "lookup")}
    total_ops = sum(len(v) for v in merged.values())
    out = {
        "ops": total_ops,
        "ops_per_s": round(total_ops / seconds, 1),
        "mib_per_s": round(sum(s["bytes"] for s in all_stats) / seconds / MIB, 1),
        "errors": sum(s["errors"] for s in all_stats),
        "get_hits": sum(s["hits"] for s in all_stats),
        "get_misses": sum(s["misses"] for s in all_stats),
        "error_samples": [m for s in all_stats for m in s["messages"]][:5],
    }
    for op, samples in merged.items():
        out[f"{op}_count"] = len(samples)
        out[f"{op}_p50_ms"] = round(_percentile(samples, 0.5), 2)
        out[f"{op}_p99_ms"] = round(_percentile(samples, 0.99), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients for 10 s")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=None, help="duration (default 60)")
    parser.add_argument(
        "--processes", type=int, default=4, help="client processes the clients are spread over"
    )
    parser.add_argument("--host-mib", type=int, default=256, help="the server's host tier (MiB)")
    args = parser.parse_args()
    clients = args.clients or (8 if args.quick else 32)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    host_bytes = args.host_mib * MIB
    keys = 4 * host_bytes // LAYOUT.chunk_nbytes(TOKENS)
    with tempfile.TemporaryDirectory() as home:
        env = {"KVFUSE_HOST_BYTES": f"{args.host_mib}MiB", "KVFUSE_DISK_BYTES": f"{2 * args.host_mib}MiB"}
        server = launch(Path(home), env)
        try:
            rest = server.rss_bytes()
            stop, peak = threading.Event(), [rest]
            sampler = threading.Thread(target=_sample_rss, args=(server, stop, peak), daemon=True)
            sampler.start()
            ctx = mp.get_context("spawn")
            queue, go = ctx.Queue(), ctx.Event()
            procs = min(args.processes, clients)
            workers = []
            for p in range(procs):
                threads = clients // procs + (1 if p < clients % procs else 0)
                w = ctx.Process(
                    target=_worker, args=(server.url, 1000 * p, threads, seconds, keys, queue, go)
                )
                w.start()
                workers.append(w)
            for _ in workers:
                assert queue.get(timeout=600) == "ready"
            go.set()
            started = time.perf_counter()
            all_stats = [s for _ in workers for s in queue.get(timeout=seconds + 600)]
            for w in workers:
                w.join()
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            store = KVClient(server.url).stats()
        finally:
            server.stop()
    body = LAYOUT.chunk_nbytes(TOKENS) + 4096
    # at rest + bodies in flight (2 per client) + entries waiting in the write-behind queue (64 by default)
    overhead = rest + 2 * clients * body + 64 * body
    result = {
        "bench": "server_load",
        "clients": clients,
        "seconds": round(elapsed, 1),
        "chunk_mib": round(body / MIB, 2),
    }
    result.update(_summarize(all_stats, elapsed))
    result.update(
        {
            "host_bytes_mib": args.host_mib,
            "host_held_mib": round(store["tiers"]["host"]["bytes"] / MIB, 1),
            "disk_held_mib": round(store["tiers"]["disk"]["bytes"] / MIB, 1),
            "evictions": store["tiers"]["host"]["evictions"],
            "server_rss_at_rest_mib": round(rest / MIB, 1),
            "server_rss_peak_mib": round(peak[0] / MIB, 1),
            "memory_budget_mib": round((host_bytes + overhead) / MIB, 1),
        }
    )
    result["memory_within_budget"] = peak[0] <= host_bytes + overhead
    result["ok"] = result["ops"] > 0 and result["errors"] == 0 and result["memory_within_budget"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
