"""Documents in Redis, one key per entry with a native expiry (PXAT), so Redis drops stale entries too."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator

import redis

from semcache.store import Entry, StoreUnavailable

log = logging.getLogger(__name__)
_ERRORS = (redis.ConnectionError, redis.TimeoutError)
LOG_ENTRIES = 100_000  # change log kept for other processes; one further behind re-reads the whole store
WAKE_RETRY_S = 1.0  # after a failed wake-up PING, none is tried for this long (a dead Redis costs nothing)


def _stream_id(raw: str | bytes) -> tuple[int, int]:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


class RedisStore:
    def __init__(
        self, url: str, prefix: str = "kvfuse:semcache:", timeout_s: float = 2.0, wake: bool = False
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://, got {url!r}")
        self.prefix = prefix
        self.url = re.sub(r"//[^@/]*@", "//***@", url)  # shown in errors and health: never a password
        self._r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._epoch_key = f"{prefix}epoch"
        self._settings_key = f"{prefix}categories"
        self._log_key = f"{prefix}log"
        self.wake_enabled = wake
        pool = self._r.connection_pool
        # its own connection, named so an operator sees what sends the PINGs (CLIENT LIST)
        self._wake_conn = pool.connection_class(**{**pool.connection_kwargs, "client_name": f"{prefix}wake"})
        self._wake_lock = threading.Lock()
        self._wake_pending = False  # a PING sent whose reply is not read yet
        self._wake_retry_at = 0.0

    def _key(self, entry_id: str) -> str:
        return f"{self.prefix}e:{entry_id}"

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except _ERRORS as exc:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {exc}") from exc

    def epoch(self) -> str | None:
        raw = self._call(self._r.get, self._epoch_key)
        return raw.decode() if raw else None

    def ensure_epoch(self) -> str:
        self._call(self._r.set, self._epoch_key, uuid.uuid4().hex, None, None, True)  # NX
        return self.epoch() or ""

    def get_settings(self) -> bytes | None:
        """Category changes made at run time, shared by every process on this prefix."""
        return self._call(self._r.get, self._settings_key)

    def put_settings(self, raw: bytes) -> None:
        self._call(self._r.set, self._settings_key, raw)

    def put(self, entry: Entry) -> None:
        # Redis expires the document itself at the entry's expiry; the log tells other processes.
        pxat = int(entry.expires * 1000) if math.isfinite(entry.expires) else None
        self._write(lambda pipe: pipe.set(self._key(entry.id), entry.encode(), pxat=pxat), "put", [entry.id])

    def _write(self, op, kind: str, ids: list[str]) -> None:
        def run():
            pipe = self._r.pipeline(transaction=True)
            op(pipe)
            pipe.xadd(self._log_key, {"op": kind, "ids": ",".join(ids)}, maxlen=LOG_ENTRIES, approximate=True)
            pipe.execute()

        self._call(run)

    def log_position(self) -> str:
        last = self._call(self._r.xrevrange, self._log_key, "+", "-", 1)
        return last[0][0].decode() if last else "0-0"

    def read_log(self, after: str, count: int = 10_000) -> tuple[list[tuple[str, list[str]]], str, bool]:
        """Changes after `after`: ([(op, ids)], new position, truncated).

        Truncated means the entry at `after` was trimmed from the log while older than its first entry:
        changes may be lost, so the caller re-reads the whole store.
        """

        def run():
            pipe = self._r.pipeline(transaction=False)
            pipe.xrange(self._log_key, f"({after}" if after != "0-0" else "-", "+", count)
            pipe.xrange(self._log_key, after, after, 1)
            pipe.xrange(self._log_key, "-", "+", 1)
            return pipe.execute()

        rows, at_after, first = self._call(run)
        truncated = (
            after != "0-0" and not at_after and bool(first) and _stream_id(first[0][0]) > _stream_id(after)
        )
        ops = [(f[b"op"].decode(), f[b"ids"].decode().split(",")) for _, f in rows]
        return ops, rows[-1][0].decode() if rows else after, truncated

    def wake(self) -> None:
        """Send Redis a PING without waiting for its reply: called just before an index search that
        may be followed by a document fetch.

        A round trip to a Redis that sat idle is slow: measured here, a 2-document MGET took 0.44 ms
        at p50 after 20 ms without requests (sleeping or busy alike) and 0.10 ms right after another
        request (README, Semantic cache). In the cache a fetch always follows such a pause: the query's
        embedding or the previous hit's verification, a 6-layer model pass of 10-20 ms. The PING
        makes Redis wake up while the search runs. Best effort: it never waits (the previous PING's
        reply is read only once it has arrived, and no second PING is sent before that), never
        raises, and after a failure is not tried again for WAKE_RETRY_S. Off by default: the PING's
        send costs the caller too (on a loaded machine Redis, woken, takes the caller's core), and
        most lookups are misses that fetch nothing.
        """
        if not self.wake_enabled or time.monotonic() < self._wake_retry_at:
            return
        if not self._wake_lock.acquire(blocking=False):
            return  # another thread is waking it right now
        try:
            conn = self._wake_conn
            if self._wake_pending and conn.can_read(timeout=0):
                conn.read_response()
                self._wake_pending = False
            if not self._wake_pending:
                conn.send_command("PING")
                self._wake_pending = True
        except (redis.RedisError, OSError) as exc:
            log.debug("semcache: wake-up PING failed: %s", exc)
            self._wake_conn.disconnect()
            self._wake_pending = False
            self._wake_retry_at = time.monotonic() + WAKE_RETRY_S
        finally:
            self._wake_lock.release()

    def get_many(self, ids: list[str]) -> tuple[dict[str, Entry], str | None]:
        """Documents and the epoch in one command (one MGET: read at one instant, so a flushed Redis is
        noticed by the same lookup; it also runs less client code than a pipeline of two commands)."""
        *raws, epoch = self._call(self._r.mget, [self._key(i) for i in ids] + [self._epoch_key])
        found = {}
        for entry_id, raw in zip(ids, raws, strict=True):
            entry = self._decode(entry_id, raw)
            if entry is not None:
                found[entry_id] = entry
        return found, epoch.decode() if epoch else None

    def _decode(self, entry_id: str, raw: bytes | None) -> Entry | None:
        if raw is None:
            return None
        try:
            entry = Entry.decode(raw)
        except ValueError as exc:
            log.warning("semcache: dropping corrupt document %s: %s", entry_id, exc)
            return None
        return entry if entry.id == entry_id else None

    def delete(self, ids: list[str]) -> None:
        if ids:
            self._write(lambda pipe: pipe.delete(*[self._key(i) for i in ids]), "del", ids)

    def scan(self, batch: int = 1000) -> Iterator[Entry]:
        keys: list[bytes] = []
        for key in self._call(lambda: list(self._r.scan_iter(match=f"{self.prefix}e:*", count=batch))):
            keys.append(key)
            if len(keys) >= batch:
                yield from self._load(keys)
                keys = []
        yield from self._load(keys)

    def _load(self, keys: list[bytes]) -> Iterator[Entry]:
        if not keys:
            return
        for key, raw in zip(keys, self._call(self._r.mget, keys), strict=True):
            entry = self._decode(key.decode().rsplit(":", 1)[-1], raw)
            if entry is not None:
                yield entry

    def clear(self) -> None:
        keys = self._call(lambda: list(self._r.scan_iter(match=f"{self.prefix}*", count=1000)))
        for start in range(0, len(keys), 1000):
            self._call(self._r.delete, *keys[start : start + 1000])

    def describe(self) -> dict:
        try:
            self._r.ping()
            up = True
        except _ERRORS:
            up = False
        return {"backend": "redis", "url": self.url, "prefix": self.prefix, "reachable": up}
