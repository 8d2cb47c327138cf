"""Request body limits: refuse oversized bodies before they are read, and read the rest without copies.

`BodyLimit` is ASGI middleware: a declared Content-Length over `settings.max_body_bytes` gets 413 before
a byte is read, and a chunked body that grows past it is cut off with 413 as soon as it crosses. It
applies to every route, including those of other packages' routers. `read_body` fills one preallocated,
writable buffer (so tensors can view it without another copy).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
from fastapi import HTTPException, Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware enforcing `app.state.settings.max_body_bytes` (read per request: live config)."""

    def __init__(self, app: Callable, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:
                await _too_large(send, str(e))


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


async def read_body(request: Request) -> memoryview:
    """The whole body in one writable buffer; 400 when it does not match its Content-Length."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        chunks = bytearray()
        async for chunk in request.stream():  # chunked: the middleware still bounds it
            chunks += chunk
        return memoryview(chunks)
    size = int(declared)
    view = memoryview(np.empty(size, dtype=np.uint8))  # uninitialized: the body fills it
    got = 0
    async for chunk in request.stream():
        if got + len(chunk) > size:
            raise HTTPException(400, f"request body is longer than its Content-Length of {size}")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    if got != size:
        raise HTTPException(400, f"request body is truncated: {got} of {size} bytes")
    return view
