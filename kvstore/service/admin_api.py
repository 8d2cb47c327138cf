"""The admin API, `/v1/admin/...` (JSON): stats, health, entries, lookup, evict, clear, pin, config.

Open to everyone: `GET stats`, `GET health` (and `/metrics`). Everything else needs the API key when one
is configured: listing and inspecting reveal tenants' keys, and the POST/PATCH calls change state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from engine import __version__
from kvstore.connector import KVConnector
from kvstore.format import Entry
from kvstore.service.deps import Settings, Store, require_api_key
from kvstore.service.heap import heap_stats
from kvstore.service.responses import bad_request, check_key, check_keys, namespace_from, run
from kvstore.store import TieredStore
from kvstore.tiers.base import TierUnavailable
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

router = APIRouter(prefix="/v1/admin", tags=["admin"])
guarded = [Depends(require_api_key)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class KeyBody(_Body):
    key: str


class EvictBody(_Body):
    key: str | None = None
    prefix: str | None = Field(None, min_length=1)


class ClearBody(_Body):
    tier: str | None = None  # None: every tier


class LookupBody(_Body):
    keys: list[str] | None = None
    namespace: dict[str, Any] | None = None  # {"model_id", "layout": KVLayout.to_dict(), "salt"}
    tokens: list[int] | None = None


@router.get("/stats")
async def stats(request: Request, store: Store) -> dict[str, Any]:
    """Per tier: entries, bytes, capacity, hits, misses, evictions...; plus write queue and pins."""
    out = await run(store.stats)
    lm = getattr(request.app.state, "lm_server", None)
    out["server"] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app.state.started, 3),
        "lm_port": None if lm is None else lm.port,
        "receive_buffers": _receive_buffers(request),
        "heap": heap_stats(),
    }
    return out


def _receive_buffers(request: Request) -> dict[str, int]:
    """The recycled receive buffers of request bodies and lm:// values (kvstore.wire.RecycledBuffers)."""
    buffers = request.app.state.recv_buffers
    lent, idle = buffers.stats()
    return {"lent": lent, "idle": idle, "bytes": buffers.tracked_bytes}


def _disk_writable(store: TieredStore) -> dict[str, Any] | None:
    disk = next((t for t in store.tiers if isinstance(t, DiskTier)), None)
    if disk is None:
        return None
    try:
        with tempfile.NamedTemporaryFile(dir=disk.root, prefix=".health-"):
            pass
        return {"ok": True, "path": str(disk.root)}
    except OSError as e:
        return {"ok": False, "path": str(disk.root), "error": str(e)}


@router.get("/health")
async def health(request: Request, store: Store) -> dict[str, Any]:
    """Tiers reachable (Redis pinged if it was down), disk writable, write-behind queue depth."""

    def work() -> dict[str, Any]:
        out = store.health()
        disk = _disk_writable(store)
        if disk is not None:
            out["disk_writable"] = disk
            out["ok"] = out["ok"] and disk["ok"]
        out["queue_depth"] = store.stats()["pending_writes"]
        return out

    out = await run(work)
    lm = getattr(request.app.state, "lm_server", None)
    out["lm"] = None if lm is None else {"port": lm.port, "connections": lm.open_connections}
    out["status"] = "ok" if out["ok"] else "degraded"
    return out


def _entry_row(store: TieredStore, key: str) -> dict[str, Any]:
    sizes = {}
    for tier in store.tiers:
        with contextlib.suppress(Exception):  # a tier that is down just shows nothing
            size = tier.size_of(key)
            if size is not None:
                sizes[tier.name] = size
    return {"key": key, "tiers": sizes, "pinned": store.is_pinned(key)}


@router.get("/entries", dependencies=guarded)
async def list_entries(store: Store, offset: int = 0, limit: int = 100, prefix: str = "") -> dict[str, Any]:
    """A page of keys (top tier first, least recently used first within a tier) and where each lives."""
    if offset < 0 or not 1 <= limit <= 1000:
        raise HTTPException(400, f"need offset >= 0 and 1 <= limit <= 1000, got {offset}, {limit}")

    def work() -> dict[str, Any]:
        stored = store.keys()
        keys = [k for k in stored if k.startswith(prefix)]
        rows = [_entry_row(store, k) for k in keys[offset : offset + limit]]
        return {"total": len(keys), "offset": offset, "limit": limit, "entries": rows}

    return await run(work)


def _peek(store: TieredStore, key: str) -> Entry | None:
    """The entry from the first tier holding it, without promoting it."""
    for tier in store.tiers:
        if tier.contains(key):
            entry = tier.peek(key) if isinstance(tier, HostTier) else tier.get(key)
            if entry is not None:
                return entry
    # not in a tier: on its way down (queued for a slow tier), where the store's get finds it
    return store.get(key, copy=False) if store.contains(key) else None


def _describe(entry: Entry) -> dict[str, Any]:
    positions = entry.positions
    return {
        "layout": entry.layout.to_dict(),
        "tensors": {n: {"dtype": str(t.dtype), "shape": list(t.shape)} for n, t in entry.tensors.items()},
        "num_tokens": entry.num_tokens,
        "nbytes": entry.nbytes,
        "positions": None
        if positions is None or positions.numel() == 0
        else {"first": int(positions[0]), "last": int(positions[-1]), "count": positions.numel()},
        "meta": _jsonable(entry.meta),
    }


def _jsonable(value: Any) -> Any:
    """msgpack meta as JSON: bytes as hex at any depth, map keys as str."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@router.get("/entries/{key}", dependencies=guarded)
async def inspect_entry(key: str, store: Store) -> dict[str, Any]:
    """Where an entry lives and what it holds (layout, tensors, positions, meta); moves nothing."""
    bad_request(check_key, key)

    def work() -> dict[str, Any]:
        entry = _peek(store, key)
        if entry is None:
            raise KeyError(f"entry {key} is not stored")
        return {**_entry_row(store, key), **_describe(entry)}

    return await run(work)


@router.post("/lookup", dependencies=guarded)
async def lookup(body: LookupBody, store: Store) -> dict[str, Any]:
    """{keys} -> cached prefix in chunks; {namespace, tokens} -> cached prefix in tokens. Moves nothing."""
    if body.keys is not None:
        keys = bad_request(check_keys, body.keys)
        return {"chunks": await run(store.lookup, keys)}
    if body.namespace is None or not body.tokens:
        raise HTTPException(400, "send either 'keys' or 'namespace' and 'tokens'")
    connector = bad_request(lambda: KVConnector(store, namespace_from(body.namespace)))
    return {"tokens": await run(connector.lookup, body.tokens)}


@router.post("/evict", dependencies=guarded)
async def evict(body: EvictBody, store: Store) -> dict[str, Any]:
    """Remove one key, or every key starting with `prefix`, from every tier (pins included)."""
    if (body.key is None) == (body.prefix is None):
        raise HTTPException(400, "send exactly one of 'key' or 'prefix'")
    if body.key is not None:
        bad_request(check_key, body.key)
        return {"removed": int(await run(store.remove, body.key))}
    prefix = body.prefix or ""

    def work() -> int:
        stored = store.keys()
        return sum(store.remove(k) for k in stored if k.startswith(prefix))

    return {"removed": await run(work)}


def _clear_tier(store: TieredStore, name: str) -> int:
    tier = next((t for t in store.tiers if t.name == name), None)
    if tier is None:
        raise ValueError(f"unknown tier {name!r}; this store has {[t.name for t in store.tiers]}")
    store.flush()  # queued writes would land after the clear otherwise
    keys = tier.keys()
    for key in keys:
        tier.remove(key)
        if store.is_pinned(key) and not store.contains(key):
            store.unpin(key)
    return len(keys)


@router.post("/clear", dependencies=guarded)
async def clear(body: ClearBody, store: Store) -> dict[str, Any]:
    """Empty one tier (entries held by other tiers stay there) or, with no tier, the whole store."""
    if body.tier is None:
        removed = await run(lambda: len(store.keys()))
        try:
            await run(store.clear)
        except TierUnavailable as e:  # a tier did not answer: the store is not empty, say so
            raise HTTPException(503, str(e)) from None
        return {"cleared": "all", "removed": removed}
    return {"cleared": body.tier, "removed": await run(_clear_tier, store, body.tier)}


@router.post("/pin", dependencies=guarded)
async def pin(body: KeyBody, store: Store) -> dict[str, Any]:
    """Never evict this entry (404 if it is not stored)."""
    bad_request(check_key, body.key)
    await run(store.pin, body.key)
    return {"key": body.key, "pinned": True}


@router.post("/unpin", dependencies=guarded)
async def unpin(body: KeyBody, store: Store) -> dict[str, Any]:
    bad_request(check_key, body.key)
    await run(store.unpin, body.key)
    return {"key": body.key, "pinned": False}


@router.get("/config", dependencies=guarded)
async def get_config(settings: Settings) -> dict[str, Any]:
    """The running configuration (API key redacted) and which fields PATCH may change."""
    return {"settings": settings.public(), "live": sorted(settings.LIVE_FIELDS), "pid": os.getpid()}


@router.patch("/config", dependencies=guarded)
async def set_config(
    changes: dict[str, Any],
    settings: Settings,
    store: Store,
) -> dict[str, Any]:
    """Change live fields (max_body_bytes, write_through, redis_retry_s); all or nothing."""
    unknown = sorted(set(changes) - settings.LIVE_FIELDS)
    if unknown or not changes:
        raise HTTPException(
            400, f"can change only {sorted(settings.LIVE_FIELDS)} live, got {unknown or 'nothing'}"
        )
    trial = settings.model_copy()
    for name, value in changes.items():
        bad_request(setattr, trial, name, value)  # validate_assignment: pydantic checks each value
    for name in changes:
        setattr(settings, name, getattr(trial, name))
        if hasattr(store.config, name):
            setattr(store.config, name, getattr(trial, name))
    return {"settings": settings.public(), "live": sorted(settings.LIVE_FIELDS)}
