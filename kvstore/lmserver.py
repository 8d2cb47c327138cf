"""The lm:// listener: LMCache's remote protocol (PUT, GET, EXIST, HEALTH) over a TieredStore.

An unmodified LMCache with `remote_url: lm://host:port` uses this service as its remote tier; its values
share the store's tiers, capacity and eviction with every other entry.

One asyncio task per connection, requests answered in order. Payloads are received straight into the
buffer that becomes the stored tensor and sent straight from the stored tensor (`sock_recv_into`,
`sock_sendall`: no intermediate copies); store calls run on worker threads so a disk or Redis access
never stalls other connections. A PUT that is too large, has an unknown dtype or a shape that does not
match its length is read to its end and dropped (PUT has no reply; a later GET/EXIST says 400). A client
that disconnects mid-request leaves nothing behind. The protocol has no authentication: keep the port
on loopback or a trusted network.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
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
        max_value_bytes: int = 256 << 20,
        metrics: Any = None,
        buffers: RecycledBuffers | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.max_value_bytes = max_value_bytes
        self.metrics = metrics
        self.buffers = buffers or RecycledBuffers()
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
        except (Disconnected, ConnectionError, OSError):
            pass  # a client that vanishes mid-request leaves nothing stored
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
        entry = await loop.run_in_executor(None, lambda: self.store.get(key, copy=False))
        if entry is None or not is_lm_entry(entry):
            await loop.sock_sendall(sock, FAIL_REPLY)
            return FAIL
        reply, data = reply_for(entry)
        await loop.sock_sendall(sock, reply)
        await loop.sock_sendall(sock, data)
        if self.metrics is not None:
            self.metrics.lm_bytes.labels("out").inc(len(data))
        return OK

    async def _put(self, sock: socket.socket, req: Request) -> int | None:
        """Receive and store a value; None when the stream is broken (negative length)."""
        if req.length < 0:
            return None
        if req.length > self.max_value_bytes:
            await _drain(sock, req.length)
            log.warning(
                "lm:// PUT of %d bytes over the %d-byte limit dropped", req.length, self.max_value_bytes
            )
            return FAIL
        buffer = self.buffers.take(req.length)  # memory used before, if a released one fits
        payload = torch.from_numpy(buffer)
        if not await _recv_into(sock, buffer.data):
            raise Disconnected
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

    def _observe(self, command: int, code: int | None, seconds: float) -> None:
        if self.metrics is not None:
            name = COMMANDS.get(command, "unknown")
            self.metrics.lm_seconds.labels(name, str(code or "broken")).observe(seconds)


async def _recv_into(sock: socket.socket, view: memoryview, at_boundary: bool = False) -> bool:
    """Fill `view`; False on a clean close before the first byte at a request boundary."""
    loop = asyncio.get_running_loop()
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            if got == 0 and at_boundary:
                return False
            raise Disconnected
        got += n
    return True


async def _drain(sock: socket.socket, length: int) -> None:
    """Read and discard `length` bytes (an over-limit PUT), keeping the stream in step."""
    scratch = memoryview(bytearray(min(length, _DRAIN_CHUNK)))
    left = length
    while left:
        part = scratch[: min(left, len(scratch))]
        await _recv_into(sock, part)
        left -= len(part)
