"""The lm:// listener: LMCache's remote protocol (PUT, GET, EXIST, HEALTH) over a TieredStore.

An unmodified LMCache with `remote_url: lm://host:port` uses this service as its remote tier; its values
share the store's tiers, capacity and eviction with every other entry.

One asyncio task per connection, requests answered in order. Payloads are received straight into the
buffer that becomes the stored tensor and sent straight from the stored tensor (`sock_recv_into`,
`sock_sendall`: no intermediate copies); store calls run on worker threads so a disk or Redis access
never stalls other connections. A PUT that is too large, has an unknown dtype or a shape that does not
match its length is read to its end and dropped (PUT has no reply; a later GET/EXIST says 400). A client
that disconnects mid-request leaves nothing behind.

Bounds: the value limit is read per PUT (`limit()`, the server's live `max_body_bytes`); the PUT
buffers being filled at once hold at most `inflight_bytes` (a PUT that would pass it waits for others
to finish, so N slow clients cannot make the server hold N x the limit), and a PUT whose client sends
nothing for `idle_timeout_s`, or averages less than `min_rate` after that grace, is cut off and its
buffer released. The protocol has no authentication:
the listener binds to its own host (`lm_host`, loopback by default, whatever the HTTP `--host`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import torch

from kvstore.lmproto import (
    CLIENT,
    COMMANDS,
    EXIST,
    FAIL,
    FAIL_REPLY,
    GET,
    HEALTH,
    OK,
    OK_EMPTY_REPLY,
    PUT,
    Request,
    is_lm_entry,
    reply_for,
)
from kvstore.store import TieredStore
from kvstore.wire import RecycledBuffers

log = logging.getLogger("kvfuse.lm")
_DRAIN_CHUNK = 1 << 20


class Disconnected(Exception):
    """The client closed the connection (between or in the middle of requests)."""


class LmServer:
    """`await start()`, then serve until `await close()`. `port` is the bound port (0 picks one)."""

    def __init__(
        self,
        store: TieredStore,
        host: str = "127.0.0.1",
        port: int = 0,
        limit: Callable[[], int] = lambda: 256 << 20,
        metrics: Any = None,
        buffers: RecycledBuffers | None = None,
        inflight_bytes: int = 1 << 30,
        idle_timeout_s: float = 30.0,
        min_rate: float = 1 << 20,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.limit = limit  # the largest value, read per PUT (a live setting)
        self.metrics = metrics
        self.buffers = buffers or RecycledBuffers()
        self.inflight_bytes = inflight_bytes
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate  # bytes/s a PUT must average (after idle_timeout_s of grace)
        self._inflight = 0  # bytes of PUT buffers being received now
        self._freed: asyncio.Condition | None = None  # made on the serving loop
        self.open_connections = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        log.info("lm:// listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        if listener is None:
            raise RuntimeError("the lm:// listener is not open")
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.metrics is not None:
                self.metrics.lm_connections.inc()
            task = loop.create_task(self._serve(sock))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, sock: socket.socket) -> None:
        self.open_connections += 1
        header = bytearray(CLIENT.size)
        try:
            while await _recv_into(sock, memoryview(header), at_boundary=True):
                if not await self._handle(sock, Request.parse(header)):
                    break
        except (Disconnected, ConnectionError, OSError, TimeoutError):
            pass  # a client that vanishes or stalls mid-request leaves nothing stored
        except Exception:  # a bug must cost one connection, not leave a task failing unseen
            log.exception("lm:// connection closed on an unexpected error")
        finally:
            self.open_connections -= 1
            sock.close()

    async def _handle(self, sock: socket.socket, req: Request) -> bool:
        """Answer one request; False closes the connection (the stream can no longer be trusted)."""
        start = time.perf_counter()
        if req.command == PUT:
            code = await self._put(sock, req)
            keep = code is not None
        elif req.command in (GET, EXIST, HEALTH):
            code, keep = await self._answer(sock, req), True
        else:  # LIST (unused by LMCache) or garbage: say no, then stop trusting the stream
            await asyncio.get_running_loop().sock_sendall(sock, FAIL_REPLY)
            code, keep = FAIL, False
        self._observe(req.command, code, time.perf_counter() - start)
        return keep

    async def _answer(self, sock: socket.socket, req: Request) -> int:
        loop = asyncio.get_running_loop()
        if req.command == HEALTH:
            await loop.sock_sendall(sock, OK_EMPTY_REPLY)
            return OK
        try:
            key = req.store_key()
        except ValueError:
            await loop.sock_sendall(sock, FAIL_REPLY)
            return FAIL
        if req.command == EXIST:
            found = await loop.run_in_executor(None, self.store.contains, key)
            await loop.sock_sendall(sock, OK_EMPTY_REPLY if found else FAIL_REPLY)
            return OK if found else FAIL
        entry = self.store.get_resident(key, copy=False) or await loop.run_in_executor(
            None, lambda: self.store.get(key, copy=False)
        )
        if entry is None or not is_lm_entry(entry):
            await loop.sock_sendall(sock, FAIL_REPLY)
            return FAIL
        try:
            reply, data = reply_for(entry)
        except (KeyError, TypeError, ValueError, struct.error) as e:  # an entry not put over lm://
            log.warning("lm:// GET %r: stored entry %s is not a valid lm:// value: %s", req.key[:80], key, e)
            await loop.sock_sendall(sock, FAIL_REPLY)
            return FAIL
        await loop.sock_sendall(sock, reply)
        await loop.sock_sendall(sock, data)
        if self.metrics is not None:
            self.metrics.lm_bytes.labels("out").inc(len(data))
        return OK

    async def _put(self, sock: socket.socket, req: Request) -> int | None:
        """Receive and store a value; None when the stream is broken (negative length)."""
        if req.length < 0:
            return None
        limit = self.limit()
        if req.length > limit:
            await _drain(sock, req.length, self.idle_timeout_s)
            log.warning("lm:// PUT of %d bytes over the %d-byte limit dropped", req.length, limit)
            return FAIL
        await self._reserve(req.length)
        try:
            buffer = self.buffers.take(req.length)  # memory used before, if a released one fits
            try:
                # a client trickling a byte at a time would hold its share of the budget forever
                within = self.idle_timeout_s + req.length / self.min_rate
                await _recv_into(sock, buffer.data, idle_s=self.idle_timeout_s, within_s=within)
            except BaseException:
                del buffer  # released before the waiting PUTs are let in
                raise
        finally:
            await self._release(req.length)
        payload = torch.from_numpy(buffer)
        if self.metrics is not None:
            self.metrics.lm_bytes.labels("in").inc(req.length)
        try:
            req.check_value()
            entry = req.to_entry(payload)
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.store.put(entry, copy=False))
        except (ValueError, TypeError) as e:
            log.warning("lm:// PUT %r dropped: %s", req.key[:80], e)
            return FAIL
        return OK

    async def _reserve(self, nbytes: int) -> None:
        """Wait until `nbytes` more PUT buffer fits in `inflight_bytes` (one PUT alone always fits)."""
        if self._freed is None:
            self._freed = asyncio.Condition()
        async with self._freed:
            await self._freed.wait_for(
                lambda: self._inflight == 0 or self._inflight + nbytes <= self.inflight_bytes
            )
            self._inflight += nbytes

    async def _release(self, nbytes: int) -> None:
        assert self._freed is not None  # made by _reserve
        async with self._freed:
            self._inflight -= nbytes
            self._freed.notify_all()

    def _observe(self, command: int, code: int | None, seconds: float) -> None:
        if self.metrics is not None:
            name = COMMANDS.get(command, "unknown")
            self.metrics.lm_seconds.labels(name, str(code or "broken")).observe(seconds)


async def _recv_into(
    sock: socket.socket,
    view: memoryview,
    at_boundary: bool = False,
    idle_s: float | None = None,
    within_s: float | None = None,
) -> bool:
    """Fill `view`; False on a clean close before the first byte at a request boundary. `idle_s`: a
    client that sends nothing for that long is cut off (TimeoutError), and `within_s`: one that takes
    longer in all; between requests, connections may idle as long as they like (LMCache keeps its
    connection open). One timeout per read, never nested: Python 3.11's wait_for can lose an outer
    cancellation when the inner read completes at the same moment."""
    loop = asyncio.get_running_loop()
    end = None if within_s is None else loop.time() + within_s
    got = 0
    while got < len(view):
        timeout = idle_s
        if end is not None:
            left = end - loop.time()
            if left <= 0:
                raise TimeoutError(f"value not received within {within_s:.1f} s")
            timeout = left if timeout is None else min(timeout, left)
        n = await asyncio.wait_for(loop.sock_recv_into(sock, view[got:]), timeout)
        if n == 0:
            if got == 0 and at_boundary:
                return False
            raise Disconnected
        got += n
    return True


async def _drain(sock: socket.socket, length: int, idle_s: float) -> None:
    """Read and discard `length` bytes (an over-limit PUT), keeping the stream in step."""
    scratch = memoryview(bytearray(min(length, _DRAIN_CHUNK)))
    left = length
    while left:
        part = scratch[: min(left, len(scratch))]
        await _recv_into(sock, part, idle_s=idle_s)
        left -= len(part)
