"""The data plane, `/v1/kv/...`: what RemoteConnector and other engines call.

Bodies are kvstore.wire frames (msgpack header + raw tensor bytes) or, for whole stored entries, the
checksummed entry format of kvstore.format (so a get is verified end to end). Token calls name their
namespace `{"model_id", "layout", "salt"}` and run the in-process KVConnector on the server, so the
chunking rules exist once. Every route needs the API key when one is configured.

    POST /v1/kv/lookup            {namespace, tokens} -> {tokens}   or {keys} -> {chunks}
    POST /v1/kv/store             {namespace, tokens, start, positions?} + kv -> {stored}
    POST /v1/kv/retrieve          {namespace, tokens} -> {tokens, positions} + kv
    POST /v1/kv/segments/put      {namespace, tokens, positions?, pin} + kv -> {key}
    POST /v1/kv/segments/get      {namespace, tokens} -> entry | 404
    POST /v1/kv/segments/has      {namespace, tokens} -> {present}
    GET  /v1/kv/entries/{key}     -> entry | 404
    PUT  /v1/kv/entries/{key}     entry (?pin=true) -> {key}
    POST /v1/kv/entries/get       {keys} -> the entries as blobs (kvstore.wire.encode_blobs)
    POST /v1/kv/entries/put       {pin} + the entries as blobs -> {stored}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from kvstore.connector import KVConnector
from kvstore.format import Entry, decode, encode
from kvstore.service.body import read_body
from kvstore.service.deps import Store, require_api_key
from kvstore.service.responses import (
    MAX_KEYS,
    BuffersResponse,
    bad_request,
    check_key,
    check_keys,
    frame_response,
    namespace_from,
    run,
)
from kvstore.store import TieredStore
from kvstore.wire import (
    ENTRY_CONTENT_TYPE,
    decode_frame,
    encode_blobs,
    positions_from,
    split_blobs,
    tokens_from,
)

router = APIRouter(prefix="/v1/kv", tags=["data plane"], dependencies=[Depends(require_api_key)])
_FRAME_BODY = {"requestBody": {"content": {"application/x-kvfuse-frame": {}}, "required": True}}
_ENTRY_BODY = {"requestBody": {"content": {ENTRY_CONTENT_TYPE: {}}, "required": True}}
# what a lookup may take on the event loop (~1 ms): chunk keys, and tokens to hash into them
_INLINE_LOOKUP_KEYS = 128
_INLINE_LOOKUP_TOKENS = 32768


async def _frame(request: Request) -> tuple[dict[str, Any], dict]:
    return bad_request(decode_frame, await read_body(request))


def _connector(store: TieredStore, header: dict[str, Any]) -> KVConnector:
    return KVConnector(store, namespace_from(header.get("namespace")), _flag(header, "partial", True))


def _flag(header: dict[str, Any], name: str, default: bool) -> bool:
    """A true/false header field; ValueError for anything else (the string "false" is not false)."""
    value = header.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name!r} must be true or false, got {value!r:.40}")
    return value


def _kv(tensors: dict) -> Any:
    if set(tensors) != {"kv"}:
        raise ValueError(f"the body must carry exactly one tensor 'kv', got {sorted(tensors)}")
    return tensors["kv"]


def _entry_response(entry: Entry | None, what: str) -> Response:
    if entry is None:
        raise HTTPException(404, f"{what} is not stored")
    return BuffersResponse(encode(entry), media_type=ENTRY_CONTENT_TYPE)


@router.post("/lookup", openapi_extra=_FRAME_BODY)
async def lookup(request: Request, store: Store) -> Response:
    """The longest cached prefix: in tokens for {namespace, tokens}, in chunks for {keys}."""
    header, _ = await _frame(request)
    if "keys" in header:
        keys = bad_request(check_keys, header["keys"])
        inline = len(keys) <= _INLINE_LOOKUP_KEYS
        return frame_response({"chunks": await _lookup(store, store.lookup, keys, inline)})
    tokens = bad_request(tokens_from, header.get("tokens"))
    connector = bad_request(_connector, store, header)
    chunks = bad_request(_chunk_count, connector, tokens)
    inline = chunks <= _INLINE_LOOKUP_KEYS and len(tokens) <= _INLINE_LOOKUP_TOKENS
    return frame_response({"tokens": await _lookup(store, connector.lookup, tokens, inline)})


async def _lookup(store: TieredStore, fn: Callable[[Any], int], arg: Any, inline: bool) -> int:
    # Local tiers answer from memory in ~0.1 ms for 8 chunks: a thread hop would cost as much and adds
    # scheduling delay under load (the lookup p99). A Redis tier's round trip, or many keys to hash and
    # find (a long prompt, or a client's tiny chunk size), must not stall the event loop: those go to
    # the thread pool.
    if store.lookup_is_local and inline:
        return bad_request(fn, arg)
    return await run(fn, arg)


def _chunk_count(connector: KVConnector, tokens: Any) -> int:
    """How many chunk keys `tokens` make; ValueError past MAX_KEYS (the namespace's chunk size is the
    client's: one token per chunk would make one entry per token)."""
    size = connector.layout.chunk_tokens
    chunks = -(-len(tokens) // size)
    if chunks > MAX_KEYS:
        raise ValueError(
            f"{len(tokens)} tokens make {chunks} chunks of {size} tokens; at most {MAX_KEYS} per request"
        )
    return chunks


@router.post("/store", openapi_extra=_FRAME_BODY)
async def store_prefix(request: Request, store: Store) -> Response:
    """Store the KV of tokens[start:] as prefix chunks (chunks already cached are skipped)."""
    header, tensors = await _frame(request)

    def work() -> int:
        connector = _connector(store, header)
        tokens = tokens_from(header.get("tokens"))
        _chunk_count(connector, tokens)
        positions = positions_from(header.get("positions"))
        return connector.store(tokens, _kv(tensors), positions, start=header.get("start", 0))

    return frame_response({"stored": await run(work)})


@router.post("/retrieve", openapi_extra=_FRAME_BODY)
async def retrieve(request: Request, store: Store) -> Response:
    """The KV of the longest cached prefix (`tokens` 0 and no tensor when nothing is cached)."""
    header, _ = await _frame(request)
    tokens = bad_request(tokens_from, header.get("tokens"))
    connector = bad_request(_connector, store, header)
    bad_request(_chunk_count, connector, tokens)
    hit = await run(connector.retrieve, tokens)
    if hit is None:
        return frame_response({"tokens": 0})
    positions = hit.positions.contiguous().numpy().astype("<i8").tobytes()
    return frame_response({"tokens": hit.num_tokens, "positions": positions}, {"kv": hit.kv})


@router.post("/segments/put", openapi_extra=_FRAME_BODY)
async def put_segment(request: Request, store: Store) -> Response:
    """Store a passage's KV under its position-free segment key."""
    header, tensors = await _frame(request)

    def work() -> str:
        connector = _connector(store, header)
        tokens = tokens_from(header.get("tokens"))
        positions = positions_from(header.get("positions"))
        return connector.put_segment(tokens, _kv(tensors), positions, pin=_flag(header, "pin", False))

    return frame_response({"key": await run(work)}, status_code=201)


@router.post("/segments/get", openapi_extra=_FRAME_BODY)
async def get_segment(request: Request, store: Store) -> Response:
    header, _ = await _frame(request)
    tokens = bad_request(tokens_from, header.get("tokens"))
    connector = bad_request(_connector, store, header)
    return _entry_response(await run(connector.get_segment, tokens), "segment")


@router.post("/segments/has", openapi_extra=_FRAME_BODY)
async def has_segment(request: Request, store: Store) -> Response:
    header, _ = await _frame(request)
    tokens = bad_request(tokens_from, header.get("tokens"))
    connector = bad_request(_connector, store, header)
    return frame_response({"present": await run(connector.has_segment, tokens)})


@router.get("/entries/{key}")
async def get_entry(key: str, store: Store) -> Response:
    """One stored entry in the checksummed entry format."""
    bad_request(check_key, key)
    entry = store.get_resident(key, copy=False) or await run(store.get, key, False)
    return _entry_response(entry, f"entry {key}")


@router.put("/entries/{key}", status_code=201, openapi_extra=_ENTRY_BODY)
async def put_entry(key: str, request: Request, store: Store, pin: bool = False) -> dict[str, str]:
    """Store one entry (its header must name the same key); ?pin=true pins it."""
    bad_request(check_key, key)
    # frozen: the body is this request's own buffer, so its verified checksum serves later gets
    entry = bad_request(lambda body: decode(body, key, frozen=True), await read_body(request))
    await run(lambda: store.put(entry, pin=pin, copy=False))
    return {"key": key}


@router.post("/entries/get", openapi_extra=_FRAME_BODY)
async def get_entries(request: Request, store: Store) -> Response:
    """Many entries in one round trip, in the order asked (size -1: absent)."""
    header, _ = await _frame(request)
    keys = bad_request(check_keys, header.get("keys"))
    entries = await run(lambda: [store.get(k, copy=False) for k in keys])
    return BuffersResponse(encode_blobs({}, [None if e is None else encode(e) for e in entries]))


def _decode_all(header: dict[str, Any], tensors: dict) -> list[Entry]:
    """Decode every entry of a batch before storing any (a bad one rejects the whole batch)."""
    entries = [decode(blob, frozen=True) for blob in split_blobs(header, tensors) if blob is not None]
    for entry in entries:
        check_key(entry.key)
    return entries


@router.post("/entries/put", status_code=201, openapi_extra=_FRAME_BODY)
async def put_entries(request: Request, store: Store) -> Response:
    header, tensors = await _frame(request)
    entries = bad_request(_decode_all, header, tensors)
    pin = bad_request(_flag, header, "pin", False)
    # copy: a stored entry must not keep the whole batch body alive
    await run(lambda: _put_all(store, entries, pin))
    return frame_response({"stored": len(entries)}, status_code=201)


def _put_all(store: TieredStore, entries: list[Entry], pin: bool) -> None:
    for entry in entries:
        store.put(entry, pin=pin)
