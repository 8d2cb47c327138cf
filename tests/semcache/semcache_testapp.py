"""A minimal app around the semcache router, for HTTP tests until server.py carries the routes."""

from __future__ import annotations

from fastapi import FastAPI

from semcache.api import router


def create_app() -> FastAPI:
    app = FastAPI(title="semcache test app")
    app.include_router(router)
    return app
