"""The kvfuse service: one FastAPI app over one TieredStore, run by `kvfuse serve`.

    create_app(settings=None, store=None) -> FastAPI

Routes: `/v1/kv/...` (data plane: kvstore/service/kv_api.py), `/v1/admin/...` (admin: admin_api.py),
`/metrics` (Prometheus), `/docs` (OpenAPI), `/v1/semcache/...` (semcache/api.py), plus any other
package's router added below. With
`settings.lm_port` set, the same process also listens for LMCache's lm:// protocol (kvstore/lmserver.py)
over the same store. Settings come from `KVFUSE_*` variables and an optional TOML file
(kvstore/service/settings.py). The store is opened at startup and closed (queued writes finished, memory
entries persisted to disk) at shutdown, unless the caller passed its own `store`.

Adding a package's routes: write an `APIRouter` in `<package>/api.py` and add one `include_router` line
in `create_app`. What a route may use (kvstore/service/deps.py and body.py):
- `Depends(require_api_key)`: 401 unless the request carries the configured key (`X-API-Key: K` or
  `Authorization: Bearer K`); put it on every route that changes state or returns tenants' data.
- `Depends(get_store)` -> the TieredStore; `Depends(get_settings)` -> ServerSettings (the running
  configuration, `settings.api_key`, `settings.max_body_bytes`...).
- `app.state.api_key` holds the key as a plain str (or None) for code that is not a route.
- Request bodies are already bounded by `settings.max_body_bytes` for every route (413), so routers need
  no limit of their own; `await read_body(request)` reads a body into one writable buffer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from blend import api as rag_api
from engine import __version__
from kvstore.lmserver import LmServer
from kvstore.service import admin_api, kv_api
from kvstore.service.body import BodyLimit, bulk_protocol
from kvstore.service.deps import KeyGate, key_accepted
from kvstore.service.heap import freeze_heap
from kvstore.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kvstore.service.metrics import Metrics, Timing
from kvstore.service.responses import validation_error
from kvstore.service.settings import ServerSettings
from kvstore.store import TieredStore
from kvstore.wire import RecycledBuffers
from semcache import api as semcache_api

log = logging.getLogger("kvfuse.server")


def create_app(settings: ServerSettings | None = None, store: TieredStore | None = None) -> FastAPI:
    """The app; its store is opened from `settings` at startup unless `store` is given (then not closed)."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="kvfuse",
        version=__version__,
        description="KV-cache service: tiered KV store, LMCache lm:// tier, admin API, RAG cache layer",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.api_key = None if settings.api_key is None else settings.api_key.get_secret_value()
    app.state.store = store
    app.state.own_store = store is None
    app.state.metrics = None if store is None else Metrics(store)
    app.state.lm_server = None
    app.state.recv_buffers = RecycledBuffers()  # HTTP bodies and lm:// values, reused once released
    app.state.started = time.monotonic()
    app.add_middleware(BodyLimit, limit=lambda path: body_limit(app, path))
    app.add_middleware(KeyGate, api_key=lambda: app.state.api_key)  # before BodyLimit reads anything
    app.add_middleware(Timing, metrics=lambda: app.state.metrics)  # outermost: times 413s too
    app.include_router(kv_api.router)
    app.include_router(admin_api.router)
    app.include_router(semcache_api.router)
    app.include_router(rag_api.router)
    app.add_api_route("/metrics", _metrics, methods=["GET"], tags=["admin"])
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


def body_limit(app: FastAPI, path: str) -> int:
    """The body limit of a request to `path`: the server's, or a router's tighter one."""
    limit = app.state.settings.max_body_bytes
    own = semcache_api.body_limit(app, path)
    return limit if own is None else min(limit, own)


async def _metrics(request: Request) -> Response:
    """Prometheus metrics, names prefixed `kvfuse_` (open: no API key needed)."""
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServerSettings = app.state.settings
    if app.state.store is None:
        app.state.store = TieredStore(settings.store_config())
        app.state.metrics = Metrics(app.state.store)
    if settings.lm_port is not None:
        lm = LmServer(
            app.state.store,
            settings.lm_host,
            settings.lm_port,
            lambda: app.state.settings.max_body_bytes,  # live: PATCH /v1/admin/config applies at once
            app.state.metrics,
            app.state.recv_buffers,
        )
        if app.state.api_key is not None and settings.lm_host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("lm:// on %s takes no API key (the protocol has none)", settings.lm_host)
        await lm.start()
        app.state.lm_server = lm
    log.info("kvfuse store: %s", [t.name for t in app.state.store.tiers])
    freeze_heap()
    try:
        yield
    finally:
        if app.state.lm_server is not None:
            await app.state.lm_server.close()
        if app.state.own_store:
            app.state.store.close()


def _return_freed_memory() -> None:
    """Serve KV-sized buffers from mmap, so an evicted entry's memory goes back to the OS at once.

    glibc otherwise raises its mmap threshold after the first large free and keeps later buffers in
    per-thread heaps it rarely trims: the process would grow well past the store's byte capacity.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(name).mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD


def run(settings: ServerSettings) -> None:
    """Serve until interrupted (uvicorn; uvloop and httptools when installed)."""
    import torch
    import uvicorn

    # The server only copies bytes; torch's intra-op threads would spin against the requests' threads.
    torch.set_num_threads(1)
    _return_freed_memory()

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    app = create_app(settings)
    protocol = None
    if settings.bulk_bodies:
        protocol = bulk_protocol(
            lambda path: body_limit(app, path),
            app.state.recv_buffers,
            lambda headers: key_accepted(headers, app.state.api_key),
        )
    uvicorn.run(
        app,
        http=protocol or "auto",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",  # one line per request costs more than a lookup
        timeout_keep_alive=60,  # engines keep one connection open between requests
    )
