"""Responses and request parsing shared by the data-plane and admin routers."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kvstore.format import CorruptEntry
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.wire import CONTENT_TYPE, Buffers, encode_frame

# Hex prefix/segment keys, lm:// internal keys and hand-made keys; never a path ("/", leading ".").
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,199}$")
MAX_KEYS = 4096
_JOIN_BELOW = 64 << 10  # response bodies smaller than this are copied into one buffer
T = TypeVar("T")


class BuffersResponse(Response):
    """A body sent as several buffers (header + tensor views) without joining them into one copy."""

    def __init__(self, buffers: Buffers, media_type: str = CONTENT_TYPE, status_code: int = 200) -> None:
        super().__init__(content=b"", status_code=status_code, media_type=media_type)
        self.buffers = [b for b in buffers if len(b)]
        size = sum(len(b) for b in self.buffers)
        if size < _JOIN_BELOW:  # one body write instead of one per part (a frame's prefix, header)
            self.buffers = [b"".join(self.buffers)] if self.buffers else []
        self.headers["content-length"] = str(size)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for i, buf in enumerate(self.buffers):
            await send({"type": "http.response.body", "body": buf, "more_body": i + 1 < len(self.buffers)})
        if not self.buffers:
            await send({"type": "http.response.body", "body": b""})


def frame_response(header: dict[str, Any], tensors: dict | None = None, status_code: int = 200) -> Response:
    return BuffersResponse(encode_frame(header, tensors), status_code=status_code)


async def validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for a RequestValidationError, also when the refused input held NaN or Infinity
    (FastAPI's own handler echoes the input as JSON, which has no such numbers, and fails with a 500)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [str(exc)]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(_json_safe(errors))})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def msgpack_body(value: Any) -> bytes:
    return msgpack.packb(value)


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking store work off the event loop; bad input becomes a 4xx naming it."""
    try:
        return await run_in_threadpool(fn, *args)
    except KeyError as e:
        raise HTTPException(404, str(e.args[0]) if e.args else "not found") from None
    except (CorruptEntry, ValueError, TypeError) as e:
        raise HTTPException(400, str(e)) from None


def bad_request(fn: Callable[..., T], *args: Any) -> T:
    """Call a parser; its ValueError/TypeError become a 400."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise HTTPException(400, str(e)) from None


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(
            f"invalid key {key!r:.220}: 1-200 chars of [A-Za-z0-9_.:@+=-], not starting with '.'"
        )
    return key


def check_keys(keys: Any) -> list[str]:
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS:
        raise ValueError(f"'keys' must be a list of 1 to {MAX_KEYS} keys")
    return [check_key(k) for k in keys]


def namespace_from(raw: Any) -> Namespace:
    """A Namespace from `{"model_id", "layout": KVLayout.to_dict(), "salt"}`."""
    if not isinstance(raw, dict):
        raise ValueError("'namespace' must be a map with model_id, layout and salt")
    layout = raw.get("layout")
    if not isinstance(layout, dict):
        raise ValueError("'namespace.layout' must be a map (KVLayout.to_dict())")
    return Namespace(raw.get("model_id", ""), KVLayout.from_dict(layout), raw.get("salt", ""))
