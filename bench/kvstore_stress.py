"""Stress of the tiered store's consistency under concurrency and Redis faults (not a speed benchmark).

    .venv/bin/python bench/kvstore_stress.py --seed 3 --ops 800 --redis-fail 0.05

Threads (default 6) put, remove and get over four tiers (host, a plain memory tier, disk, Redis at
--redis-url under a private key prefix, deleted at the end) with a write queue of 2 and a Redis tier
whose puts fail at random (--redis-fail) and which comes back after 20 ms. Each key has one owner
thread, whose puts and removes are numbered in order (a put stores its number in the entry's meta and
in its values); any thread reads. A get is **stale** when it returns number v while the owner's last
op completed before the get began was numbered above v (an older version than one acknowledged, or a
removed one); **wrong** when the values do not match the number. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvstore import Entry, KVLayout, StoreConfig, TieredStore  # noqa: E402
from kvstore.format import encoded_nbytes  # noqa: E402
from kvstore.tiers import DiskTier, HostTier, RedisTier, TierUnavailable  # noqa: E402
from kvstore.tiers.host import MemoryTier  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, chunk_tokens=4)


def _entry(key: str, v: int) -> Entry:
    kv = torch.full(LAYOUT.chunk_shape(4), float(v))
    return Entry.plain(key, LAYOUT, kv, torch.arange(4, dtype=torch.int64), v=v)


class _FlakyRedis(RedisTier):
    """The real Redis tier; each put fails (as a dropped connection) with probability `p`."""

    def __init__(self, *args, p: float, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._p, self._rng, self._lock = p, random.Random(seed), threading.Lock()

    def put(self, entry: Entry) -> None:
        with self._lock:
            fail = self._rng.random() < self._p
        if fail:
            raise TierUnavailable("injected: connection dropped during put")
        super().put(entry)


def _key(t: int, i: int) -> str:
    return f"{t:04x}{i:028x}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=800, help="operations per thread")
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--keys", type=int, default=6, help="keys per thread")
    ap.add_argument("--redis-fail", type=float, default=0.05, help="probability that a Redis put fails")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()

    one = _entry("0" * 32, 0)
    prefix = f"kvfuse-stress:{os.getpid()}:{args.seed}:"
    middle = MemoryTier(4 * one.nbytes)
    middle.name = "middle"
    redis_tier = _FlakyRedis(args.redis_url, 1 << 24, prefix, p=args.redis_fail, seed=args.seed)
    root = tempfile.mkdtemp(prefix="kvfuse-stress-")
    disk = DiskTier(Path(root) / "disk", 8 * encoded_nbytes(one), read_pool_bytes=1 << 20)
    config = StoreConfig(write_queue=2, lease_wait_s=0.01, redis_retry_s=0.02)
    store = TieredStore(config, tiers=[HostTier(4 * one.nbytes), middle, disk, redis_tier])

    done: dict[str, int] = {}  # key -> number of its owner's last completed op
    lock = threading.Lock()
    stale: list[tuple[str, int, int]] = []
    wrong: list[tuple[str, int]] = []
    errors: list[str] = []
    gets = [0]

    def work(t: int) -> None:
        rng = random.Random(args.seed * 1000 + t)
        number = dict.fromkeys((_key(t, i) for i in range(args.keys)), 0)
        try:
            for _ in range(args.ops):
                r = rng.random()
                if r < 0.55:  # 45% puts, 10% removes of an own key
                    k = _key(t, rng.randrange(args.keys))
                    number[k] += 1
                    if r < 0.45:
                        store.put(_entry(k, number[k]))
                    else:
                        store.remove(k)
                    with lock:
                        done[k] = number[k]
                    continue
                k = _key(rng.randrange(args.threads), rng.randrange(args.keys))
                with lock:
                    floor = done.get(k, 0)
                got = store.get(k)
                gets[0] += 1
                if got is not None:
                    v = int(got.meta["v"])
                    if not torch.all(got.kv == float(v)):
                        wrong.append((k, v))
                    if v < floor:
                        stale.append((k, v, floor))
        except Exception:
            errors.append(traceback.format_exc())

    t0 = time.monotonic()
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(args.threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        store.flush()
        seconds = time.monotonic() - t0
        final_stale = 0
        for k, n in done.items():
            got = store.get(k)
            final_stale += got is not None and int(got.meta["v"]) < n
        stats = store.stats()
        store.close()
    finally:
        for key in redis_tier.client.scan_iter(match=prefix + "*"):  # the prefix has no glob characters
            redis_tier.client.delete(key)
    print(
        json.dumps(
            {
                "bench": "kvstore_stress",
                "seed": args.seed,
                "threads": args.threads,
                "ops_per_thread": args.ops,
                "redis_fail": args.redis_fail,
                "gets": gets[0],
                "stale": len(stale),
                "final_stale": final_stale,
                "wrong": len(wrong),
                "errors": len(errors),
                "redis_faults": stats["tiers"]["redis"]["faults"],
                "seconds": round(seconds, 1),
                "stale_examples": stale[:3],
                "error_examples": [e.splitlines()[-1] for e in errors[:2]],
            }
        )
    )


if __name__ == "__main__":
    main()
