"""Request bodies: limits, and received in one piece. Oversized bodies are refused before they are read;
the rest go straight into the buffer that becomes the stored tensor.

`BodyLimit` is ASGI middleware: a declared Content-Length over `settings.max_body_bytes` gets 413 before
a byte is read, and a chunked body that grows past it is cut off with 413 as soon as it crosses. It
applies to every route, including those of other packages' routers.

`bulk_protocol(limit, buffers)` is uvicorn's httptools protocol with two changes. A body with a
Content-Length of 64 KiB up to the limit is read from the socket straight into one buffer (memory used
before when possible, see kvstore.wire.RecycledBuffers; the parser only sees the part that came with
the headers) and handed to the app as one message; stock uvicorn hands it over in ~64 KiB messages,
each two copies, a pause/resume of the socket and a trip through the middleware stack (a 5.6 MiB put
took ~90). Oversized, chunked and small bodies take uvicorn's usual path, and so does a body whose
request lacks the API key. And a response of 64 KiB or more leaves in full packets (TCP_CORK from its
start to its last part), not head and parts one by one. `read_body` returns a body received in one piece as it is (no copy) and fills one
buffer from any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, cast

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from kvstore.wire import RecycledBuffers, empty_buffer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware enforcing `app.state.settings.max_body_bytes` (read per request: live config)."""

    def __init__(self, app: Callable, limit: Callable[[str], int]) -> None:
        self.app = app
        self.limit = limit  # of a request's path: routers may have tighter limits than the server's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        seen = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal seen, started, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                detail = f"request body exceeds the limit of {limit} bytes"
                # answered here: FastAPI turns an error while it reads a JSON body into its own 400
                if not started:
                    started = refused = True
                    await _too_large(send, detail)
                raise BodyTooLarge(detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; what the app makes of the cut-off body is not sent
            started = started or message["type"] == "http.response.start"
            await send(message)

        # answered with 413 when it crossed (or the response had already started)
        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, tracking_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bulk_protocol(
    limit: Callable[[str], int],
    buffers: RecycledBuffers,
    authorized: Callable[[Mapping[str, str]], bool] = lambda headers: True,
) -> type | None:
    """uvicorn's httptools protocol receiving bodies of 64 KiB to `limit()` bytes in one piece, into
    buffers taken from `buffers` (None when httptools is not installed: uvicorn's default serves).

    `authorized(headers)` (lower-case names): whether a request may have a buffer of its body's size
    at all. One without the API key gets uvicorn's own path, which drops the body after the app's 401,
    so a client without the key cannot make the server hold up to `limit()` bytes per connection."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class BulkHttp(HttpToolsProtocol):
        """Reads land in a scratch buffer fed to the parser; once a bulk body's headers are parsed,
        they land in the body's buffer itself (as lm:// PUTs do) and the parser is skipped."""

        _bulk: _Bulk | None = None
        _scratch: memoryview | None = None

        def get_buffer(self, sizehint: int) -> memoryview:
            bulk = self._bulk
            if bulk is not None and bulk.raw and bulk.view is not None:
                return bulk.view[bulk.got :]
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_SCRATCH))
            return self._scratch

        def buffer_updated(self, nbytes: int) -> None:
            bulk = self._bulk
            if bulk is None or not bulk.raw or bulk.view is None:
                assert self._scratch is not None  # get_buffer handed it out for this read
                # the parser copies what it keeps (it takes any buffer, not only bytes)
                self.data_received(cast(bytes, self._scratch[:nbytes]))
                bulk = self._bulk
                if bulk is not None:  # its headers were in this read, and some of it: the rest goes raw
                    bulk.raw = True
                return
            # as uvicorn's data_received does: a client still sending after an early reply (401, 404)
            # must not be cut off by the keep-alive timer that reply armed
            self._unset_keepalive_if_required()
            bulk.got += nbytes
            if bulk.got == len(bulk.view):
                self._end_raw_body()

        def _end_raw_body(self) -> None:
            # the old parser still waits for the body it never saw: the next request needs a new one
            self.parser = httptools.HttpRequestParser(self)
            with contextlib.suppress(AttributeError):  # httptools < 0.6.3
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self.on_message_complete()

        def on_headers_complete(self) -> None:
            previous = self.cycle
            super().on_headers_complete()  # creates self.cycle and schedules the app (not on upgrades)
            if self.cycle is previous:
                self._bulk = None
                return
            size = _bulk_size(self.headers, limit(self.cycle.scope["path"]))
            if size is not None and not authorized(
                {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
            ):
                size = None
            self._bulk = None if size is None else _Bulk(self.cycle, buffers.take(size))
            _cork_responses(self.cycle)

        def on_body(self, body: bytes) -> None:
            if self._bulk is None:
                super().on_body(body)
            else:  # the part of the body that came with its headers
                self._bulk.add(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()  # wakes the app's receive()
            self._bulk = None

    class BulkBodyProtocol(asyncio.BufferedProtocol):
        """uvloop reads into a protocol's buffers only when it is no asyncio.Protocol: this wraps one."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.http = BulkHttp(*args, **kwargs)

        def connection_made(self, transport: Any) -> None:
            self.http.connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            self.http.connection_lost(exc)

        def eof_received(self) -> bool | None:
            self.http.eof_received()
            return None  # close the transport (uvicorn's protocol never keeps a half-open one)

        def pause_writing(self) -> None:
            self.http.pause_writing()

        def resume_writing(self) -> None:
            self.http.resume_writing()

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.http.get_buffer(sizehint)

        def buffer_updated(self, nbytes: int) -> None:
            self.http.buffer_updated(nbytes)

    return BulkBodyProtocol


class _Bulk:
    """One request's body, received into `view`; replaces the cycle's `receive` until it is delivered."""

    def __init__(self, cycle: Any, buffer: Any) -> None:
        self.cycle = cycle
        self.view: memoryview | None = memoryview(buffer)
        self.got = 0
        self.raw = False  # reads go straight into `view`, past the parser
        self.plain_receive = cycle.receive
        cycle.receive = self.receive  # the app's task has not started yet: it will call this one

    def add(self, data: bytes) -> None:
        end = self.got + len(data)
        view = self.view
        if view is None or end > len(view):  # the parser stops at Content-Length; never trust it blindly
            self.cycle.transport.close()
            return
        view[self.got : end] = data
        self.got = end

    async def receive(self) -> Message:
        cycle = self.cycle
        if self.view is None:  # delivered: later calls wait for a disconnect as usual
            return await self.plain_receive()
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not (cycle.disconnected or cycle.response_complete):
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        cycle.message_event.clear()
        body, self.view = self.view, None
        return {"type": "http.request", "body": body, "more_body": False}


def _cork_responses(cycle: Any) -> None:
    """Send each large response in full packets: the socket is corked from the response's start to its
    last body part. Uncorked, the head and every small part (a frame's prefix and header) leave as
    packets of their own, each waking the client, which on a busy machine costs more than the bytes.
    Small responses (a lookup's answer) are not corked: the uncorking setsockopt pushes the data
    through the loopback stack itself, ~0.25 ms of server CPU measured per request, more than the two
    small packets it saves."""
    sock = cycle.transport.get_extra_info("socket")
    if _TCP_CORK is None or sock is None:
        return
    plain_send = cycle.send
    corked = False

    async def send(message: Message) -> None:
        nonlocal corked
        if message["type"] == "http.response.start":
            corked = _declared_length(message.get("headers", [])) >= _BULK_MIN
            if corked:
                _cork(sock, 1)
        done = True
        try:
            await plain_send(message)
            done = message["type"] == "http.response.body" and not message.get("more_body", False)
        finally:
            if done and corked:  # the last part, or a failed send: let everything go
                corked = False
                _cork(sock, 0)

    cycle.send = send  # the app's task has not started yet: it will call this one


def _declared_length(headers: Any) -> int:
    """A response's Content-Length, or 0 when it has none (streamed: too rare here to cork)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _cork(sock: Any, on: int) -> None:
    with contextlib.suppress(OSError):  # the client went away: nothing left to send
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)


_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux
_BULK_MIN = 64 << 10
_SCRATCH = 256 << 10  # a read that is not a bulk body's (uvloop's own read size)


def _bulk_size(headers: list[tuple[bytes, bytes]], limit: int) -> int | None:
    """The Content-Length of a body to receive in one piece, or None (no/bad length, chunked, small, too
    large: the 413 comes from BodyLimit before anything is read)."""
    lengths = [v for k, v in headers if k == b"content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit() or any(k == b"transfer-encoding" for k, _ in headers):
        return None
    size = int(lengths[0])
    return size if _BULK_MIN <= size <= limit else None


async def read_body(request: Request) -> memoryview:
    """The whole body in one writable buffer; 400 when it does not match its Content-Length or the
    client left before sending it all (nobody reads that 400, but the request ends as an ordinary
    refusal, not as a traceback in the log)."""
    try:
        return await _read_body(request)
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before sending the whole body") from None


async def _read_body(request: Request) -> memoryview:
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        chunks = bytearray()
        async for chunk in request.stream():  # chunked: the middleware still bounds it
            chunks += chunk
        return memoryview(chunks)
    size = int(declared)
    view: memoryview | None = None
    got = 0
    async for chunk in request.stream():
        if view is None and isinstance(chunk, memoryview) and not chunk.readonly and len(chunk) == size:
            view, got = chunk, size  # received in one piece by BulkBodyProtocol: no copy
            continue
        if view is None:
            view = empty_buffer(size).data  # uninitialized: the body fills it
        if got + len(chunk) > size:
            raise HTTPException(400, f"request body is longer than its Content-Length of {size}")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    if got != size:
        raise HTTPException(400, f"request body is truncated: {got} of {size} bytes")
    return view if view is not None else memoryview(bytearray())
