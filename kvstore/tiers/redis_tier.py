"""Redis tier: entries shared by many engines and machines, bounded in bytes across all of them.

Each entry is one Redis string (the encoded entry) at `<prefix>e:<key>`. A small index (sizes hash, LRU
sorted set by last use, byte counter) lives under one hash tag so the Lua scripts that keep it consistent
run on a single Redis Cluster slot, while the entries themselves spread over the cluster. The capacity
check is part of the reservation script, so many processes sharing the tier cannot overfill it.

URLs: `redis://`, `rediss://`, `unix://` (redis-py), and `redis+cluster://` / `rediss+cluster://` for a
Redis Cluster (any node's address). Any connection failure surfaces as TierUnavailable.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import redis
import redis.cluster
import redis.exceptions

from kvstore.format import CorruptEntry, Entry, decode, encode_bytes, encoded_nbytes
from kvstore.tiers.base import Tier, TierFull, TierUnavailable, TierUsage

_RESERVE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used - old + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return -1 - used end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
"""

_RELEASE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], tonumber(old))
return tonumber(old)
"""

_FAULTS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_CLUSTER_SCHEMES = {"redis+cluster://": "redis://", "rediss+cluster://": "rediss://"}


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis | redis.cluster.RedisCluster:
    """A client for `url`; ValueError for a scheme it does not know."""
    for scheme, plain in _CLUSTER_SCHEMES.items():
        if url.startswith(scheme):
            return redis.cluster.RedisCluster.from_url(
                plain + url[len(scheme) :], socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            f"unsupported Redis URL {url!r}; use redis://, rediss://, unix://, redis+cluster:// "
            "or rediss+cluster://"
        )
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


class RedisTier(Tier):
    """Encoded entries in Redis under `prefix`, at most `capacity_bytes` (encoded bytes) in total."""

    name = "redis"
    slow = True
    networked = True

    def __init__(
        self,
        url: str,
        capacity_bytes: int,
        prefix: str = "kvfuse:",
        ttl_s: int | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive number of seconds or None, got {ttl_s!r}")
        self.url = url
        self.capacity_bytes = capacity_bytes
        self.prefix = prefix
        self.ttl_s = ttl_s  # expired entries are misses; their index slot is reclaimed on the next touch
        # Any: redis-py types every reply as a union of sync and async results (bytes | str | ...)
        self.client: Any = connect(url, timeout_s)
        tag = prefix + "{idx}"  # starts with the prefix; one cluster slot for the whole index
        self._index_keys = [tag + ":sizes", tag + ":lru", tag + ":bytes"]
        self._reserve = self.client.register_script(_RESERVE)
        self._release = self.client.register_script(_RELEASE)
        self.corrupt = 0

    def _data_key(self, key: str) -> str:
        return self.prefix + "e:" + key

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except _FAULTS as e:
            raise TierUnavailable(f"Redis at {self.url} failed during {what}: {e}") from e

    def ping(self) -> bool:
        with self._io("ping"):
            return bool(self.client.ping())

    def contains(self, key: str) -> bool:
        with self._io("contains"):
            return bool(self.client.exists(self._data_key(key)))

    def contains_many(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        with self._io("contains"):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._data_key(key))
            return [bool(n) for n in pipe.execute()]

    def entry_size(self, entry: Entry) -> int:
        return encoded_nbytes(entry)

    def put(self, entry: Entry) -> None:
        data = encode_bytes(entry)
        with self._io("put"):
            got = self._reserve(
                keys=self._index_keys, args=[entry.key, len(data), time.time(), self.capacity_bytes]
            )
            if got < 0:
                raise TierFull(
                    f"{len(data)} bytes for {entry.key} do not fit: {-got - 1} of {self.capacity_bytes} "
                    "bytes used in Redis"
                )
            try:
                self.client.set(self._data_key(entry.key), data, ex=self.ttl_s)
            except BaseException:
                self._undo_reserve(entry.key)
                raise

    def _undo_reserve(self, key: str) -> None:
        """After a failed SET: the data key may hold the older entry (or this one, if only the reply
        was lost). Delete it first and only then drop it from the index: released without the DEL
        (as before), the data key stayed readable but uncounted and out of the LRU, so never evicted.
        If the DEL fails too, the reservation stays: counted and evictable until removed."""
        with contextlib.suppress(*_FAULTS):
            self.client.delete(self._data_key(key))
            self._release(keys=self._index_keys, args=[key])

    def get(self, key: str) -> Entry | None:
        with self._io("get"):
            data = self.client.get(self._data_key(key))
            if data is None:
                self._release(keys=self._index_keys, args=[key])  # expired by TTL or deleted by hand
                return None
            try:
                entry = decode(data, expect_key=key)
            except CorruptEntry:
                self.corrupt += 1
                self.remove(key)
                return None
            self.client.zadd(self._index_keys[1], {key: time.time()}, xx=True)
            return entry

    def remove(self, key: str) -> int:
        with self._io("remove"):
            # the data key first, as in _undo_reserve: released first, a DEL that failed left the data
            # readable but uncounted and out of the LRU (never evicted); this way a failed release
            # leaves the bytes counted with no data, which the next get of the key releases
            self.client.delete(self._data_key(key))
            return int(self._release(keys=self._index_keys, args=[key]))

    def keys(self) -> list[str]:
        with self._io("keys"):
            return [k.decode() for k in self.client.zrange(self._index_keys[1], 0, -1)]

    def lru_keys(self) -> Iterator[str]:
        """Oldest first, paged by score so removals during the walk (eviction) skip nothing."""
        last, seen = "-inf", set()
        while True:
            with self._io("keys"):
                page = self.client.zrangebyscore(self._index_keys[1], last, "+inf", 0, 64, withscores=True)
            new = [(k, score) for k, score in page if k not in seen]
            if not new:
                return
            for k, _ in new:
                seen.add(k)
                yield k.decode()
            last = new[-1][1]

    def size_of(self, key: str) -> int | None:
        with self._io("size_of"):
            size = self.client.hget(self._index_keys[0], key)
            return None if size is None else int(size)

    def usage(self) -> TierUsage:
        with self._io("usage"):
            used = self.client.get(self._index_keys[2])
            return TierUsage(self.client.zcard(self._index_keys[1]), int(used or 0), self.capacity_bytes)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
