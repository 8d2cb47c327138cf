"""What a route needs from the running app: its store, its settings, and the API-key check.

Routers of other packages reuse these as FastAPI dependencies:

    router = APIRouter(prefix="/v1/x", dependencies=[Depends(require_api_key)])
    @router.get("/y")
    def route(store: Store, settings: Settings): ...   # the TieredStore and the ServerSettings
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from kvstore.service.settings import ServerSettings
from kvstore.store import TieredStore

API_KEY_HEADER = "x-api-key"


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
        raise HTTPException(
            401,
            "missing or wrong API key (send X-API-Key: KEY or Authorization: Bearer KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )


# Route parameter types: `def route(store: Store, settings: Settings)`.
Store = Annotated[TieredStore, Depends(get_store)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
