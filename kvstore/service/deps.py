"""What a route needs from the running app: its store, its settings, and the API-key check.

Routers of other packages reuse these as FastAPI dependencies:

    router = APIRouter(prefix="/v1/x", dependencies=[Depends(require_api_key)])
    @router.get("/y")
    def route(store: Store, settings: Settings): ...   # the TieredStore and the ServerSettings
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from kvstore.service.settings import ServerSettings
from kvstore.store import TieredStore

API_KEY_HEADER = "x-api-key"
_UNAUTHORIZED = "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)"


# The dependencies are `async def` although they never wait: FastAPI runs a plain `def` dependency in
# its thread pool, which cost every request two or three thread hops (a lookup's p99 paid for them).


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_store(request: Request) -> TieredStore:
    return request.app.state.store


def given_key(headers: Mapping[str, str]) -> str:
    """The key a request's headers (lower-case names) carry: `X-API-Key: K` or `Authorization: Bearer K`."""
    key = headers.get(API_KEY_HEADER, "")
    auth = headers.get("authorization", "")
    if not key and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    return key


def key_accepted(headers: Mapping[str, str], expected: str | None) -> bool:
    """Whether the headers carry the `expected` key (None: no key configured, everyone passes)."""
    return expected is None or hmac.compare_digest(given_key(headers).encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    """401 unless the request carries the configured API key (no key configured: everyone passes)."""
    expected = request.app.state.settings.api_key
    if not key_accepted(request.headers, None if expected is None else expected.get_secret_value()):
        raise HTTPException(401, _UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


class KeyGate:
    """ASGI middleware: with an API key configured, a request that may carry a body (any method but GET,
    HEAD, OPTIONS) and lacks the key gets 401 before a byte of its body is read. FastAPI reads and parses
    a JSON body before it runs a route's dependencies, so `require_api_key` alone would let a client
    without the key make the server hold max_body_bytes per request. Reads stay with the dependency
    (some are open: stats, health, metrics, docs)."""

    def __init__(self, app: Callable, api_key: Callable[[], str | None]) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        expected = self.api_key()
        if scope["type"] != "http" or expected is None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if key_accepted(headers, expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": _UNAUTHORIZED}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# Route parameter types: `def route(store: Store, settings: Settings)`.
Store = Annotated[TieredStore, Depends(get_store)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
