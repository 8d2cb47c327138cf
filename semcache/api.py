"""REST routes of the semantic cache: `/v1/semcache/...`, as a FastAPI router for server.py.

The cache lives in `app.state.semcache`; when the app has not put one there, the first request builds
it from `SemcacheSettings` (environment `KVFUSE_SEMCACHE_*`), and the router's lifespan saves its index
snapshot at shutdown. Every route needs the server's API key when one is configured: lookups return
tenants' answers, so they are guarded too.

Bodies over `max_body_bytes` (512 KiB) get 413 before FastAPI reads them: the server's body-limit
middleware and bulk protocol ask `body_limit(app, path)` for these routes' limit (a dependency would run
only after FastAPI has read and parsed the body). A declared Content-Length over the limit is refused
without reading a byte; a chunked body is cut off as soon as it crosses the limit.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

from kvstore.service.deps import require_api_key
from kvstore.service.heap import freeze_heap
from semcache.cache import SemanticCache
from semcache.settings import SemcacheSettings

_init_lock = threading.Lock()
PREFIX = "/v1/semcache"
Text = Annotated[StrictStr, Field(max_length=16_384)]  # a backstop; the cache's Limits are the rule
Ident = Annotated[StrictStr, Field(min_length=1, max_length=128)]
# JSON from Python's parser may hold NaN and Infinity: refused here (422 naming the field), not echoed as null.
Number = Annotated[float, Strict(), AllowInfNan(False)] | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class LookupBody(_Body):
    question: Text
    tenant: Ident
    category: Ident | None = None
    model: Ident = "default"


class InsertBody(_Body):
    question: Text
    answer: Annotated[StrictStr, Field(max_length=512 * 1024)]
    tenant: Ident
    category: Ident | None = None
    model: Ident = "default"
    metadata: dict[str, Any] | None = None
    ttl_s: Number | None = None


class InvalidateBody(_Body):
    tenant: Ident
    entry_id: Ident | None = None
    question: Text | None = None
    category: Ident | None = None
    model: Ident | None = None


class CategoryBody(_Body):
    threshold: Number | None = None
    ttl_s: Number | None = None
    max_entries: StrictInt | None = None
    max_bytes: StrictInt | None = None
    strict: bool | None = None
    cacheable: bool | None = None


class LoadBody(_Body):
    model: Ident = "default"
    load: Number


def _settings(request: Request) -> SemcacheSettings:
    return app_settings(request.app)


def app_settings(app: Any) -> SemcacheSettings:
    settings = getattr(app.state, "semcache_settings", None)
    if settings is None:
        settings = app.state.semcache_settings = SemcacheSettings()
    return settings


def body_limit(app: Any, path: str) -> int | None:
    """This router's body limit for a request to `path` in `app`, None when the path is not its own: for
    the server's BodyLimit middleware and bulk protocol, so that an oversized body is refused before
    any of it is received."""
    return app_settings(app).max_body_bytes if path.startswith(PREFIX + "/") else None


def get_cache(request: Request) -> SemanticCache:
    cache = getattr(request.app.state, "semcache", None)
    if cache is None:
        with _init_lock:
            cache = getattr(request.app.state, "semcache", None)
            if cache is None:
                cache = request.app.state.semcache = SemanticCache(_settings(request).cache_config())
                freeze_heap()  # the embedder's and verifier's objects live as long as the server
    return cache


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ValueError, TypeError) as exc:
        raise HTTPException(422, str(exc)) from exc


@asynccontextmanager
async def _lifespan(app) -> AsyncIterator[None]:
    yield
    cache = getattr(app.state, "semcache", None)
    if cache is not None:
        cache.close()  # snapshot the indexes so the next start skips the HNSW rebuild


Cache = Annotated[SemanticCache, Depends(get_cache)]
router = APIRouter(
    lifespan=_lifespan,
    prefix=PREFIX,
    tags=["semcache"],
    dependencies=[Depends(require_api_key)],
)


# Body fields are named like the cache's parameters, so a body passes through as keywords.
@router.post("/lookup")
def lookup(body: LookupBody, cache: Cache) -> dict:
    return dataclasses.asdict(_run(lambda: cache.lookup(**body.model_dump())))


@router.post("/insert")
def insert(body: InsertBody, cache: Cache) -> dict:
    return dataclasses.asdict(_run(lambda: cache.insert(**body.model_dump())))


@router.post("/invalidate")
def invalidate(body: InvalidateBody, cache: Cache) -> dict:
    return {"removed": _run(lambda: cache.invalidate(**body.model_dump()))}


@router.get("/categories")
def categories(cache: Cache) -> dict:
    return {"default": cache.categories.default, "categories": cache.categories.to_list()}


@router.put("/categories/{name}")
def update_category(name: str, body: CategoryBody, cache: Cache) -> dict:
    fields = body.model_dump(exclude_none=True)
    return _run(lambda: cache.update_category(name, **fields)).to_dict()


@router.post("/load")
def set_load(body: LoadBody, cache: Cache) -> dict:
    relaxed = _run(lambda: cache.set_load(body.model, body.load))
    return {"model": body.model, "load": body.load, "relaxed": relaxed}


@router.get("/stats")
def stats(cache: Cache) -> dict:
    return cache.stats()
