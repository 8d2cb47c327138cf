"""API key, body limits and bad input against a real server: 401/413/4xx, and the store stays as it was."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import msgpack
import pytest
import torch
from server_helpers import API_KEY, LAYOUT, kv

from kvstore import Entry, KVLayout, Namespace
from kvstore.format import encode_bytes
from kvstore.http_client import KVClient
from kvstore.remote import RemoteConnector
from kvstore.wire import encode_blobs, encode_frame, token_bytes

NS = {"model_id": "sec-model", "layout": LAYOUT.to_dict(), "salt": ""}


def _raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {}


def _frame(header: dict, tensors: dict | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(header, tensors))


def _snapshot(client: KVClient) -> tuple:
    stats = client.stats()["tiers"]
    return sorted(e["key"] for e in client.entries(limit=1000)["entries"]), {
        t: r["bytes"] for t, r in stats.items()
    }


@pytest.fixture
def keyed(secured):
    client = secured.client(API_KEY)
    client.put(Entry.plain("sec-existing", LAYOUT, kv(16)))
    return client


STATE_CHANGES = [
    ("PUT", "/v1/kv/entries/sec-x"),
    ("POST", "/v1/kv/entries/put"),
    ("POST", "/v1/kv/store"),
    ("POST", "/v1/kv/segments/put"),
    ("POST", "/v1/admin/evict"),
    ("POST", "/v1/admin/clear"),
    ("POST", "/v1/admin/pin"),
    ("POST", "/v1/admin/unpin"),
    ("PATCH", "/v1/admin/config"),
]
GUARDED_READS = [
    ("GET", "/v1/kv/entries/sec-existing"),
    ("POST", "/v1/kv/lookup"),
    ("POST", "/v1/kv/retrieve"),
    ("GET", "/v1/admin/entries"),
    ("GET", "/v1/admin/entries/sec-existing"),
    ("GET", "/v1/admin/config"),
]


@pytest.mark.parametrize(("method", "path"), STATE_CHANGES + GUARDED_READS)
def test_guarded_calls_refuse_a_missing_or_wrong_key(secured, keyed, method, path):
    before = _snapshot(keyed)
    body = json.dumps({"key": "sec-existing", "tier": None}).encode()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        status, detail = _raw(secured, method, path, body, {**headers, "Content-Type": "application/json"})
        assert status == 401 and "API key" in detail["detail"]
    assert _snapshot(keyed) == before
    assert keyed.get("sec-existing") is not None


def test_open_reads_need_no_key(secured):
    for path in ("/v1/admin/stats", "/v1/admin/health", "/metrics", "/docs", "/openapi.json"):
        assert _raw(secured, "GET", path)[0] == 200, path


def test_the_key_is_accepted_in_either_header(secured, keyed):
    entry = Entry.plain("sec-bearer", LAYOUT, kv(16, seed=9))
    status, _ = _raw(
        secured,
        "PUT",
        "/v1/kv/entries/sec-bearer",
        encode_bytes(entry),
        {"Authorization": f"Bearer {API_KEY}"},
    )
    assert status == 201
    assert torch.equal(keyed.get("sec-bearer").kv, entry.kv)  # X-API-Key (KVClient's header)
    assert keyed.evict("sec-bearer") == 1
    remote = RemoteConnector(KVClient(secured.url, api_key=API_KEY), Namespace("sec-model", LAYOUT))
    assert remote.store(list(range(20)), kv(20)) == 2 and remote.lookup(list(range(20))) == 20
    with pytest.raises(PermissionError):
        RemoteConnector(secured.url, Namespace("sec-model", LAYOUT)).lookup(list(range(20)))
    with pytest.raises(PermissionError):
        secured.client().clear()


def _oversized_chunked(secured, method: str = "PUT", path: str = "/v1/kv/entries/sec-chunked") -> int:
    """A chunked body (no Content-Length) that grows past the 1 MiB limit."""
    parts = urlsplit(secured.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunks = (bytes(64 << 10) for _ in range(40))  # 2.5 MiB in 64 KiB chunks
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    conn.request(method, path, body=chunks, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_oversized_bodies_get_413(secured, keyed):
    before = _snapshot(keyed)
    big = Entry.plain("sec-big", LAYOUT, kv(48))  # 1.05 MiB encoded
    with pytest.raises(ValueError, match="413"):
        keyed.put(big)
    assert _oversized_chunked(secured) == 413
    assert _oversized_chunked(secured, "POST", "/v1/admin/evict") == 413  # JSON route: was FastAPI's 400
    assert _snapshot(keyed) == before


def _forged_entry(key: str, shape: list) -> bytes:
    """Entry bytes with a valid checksum around a hand-made header (what a hostile client can send)."""
    import xxhash

    from kvstore.format import _PREFIX, MAGIC

    header = {
        "key": key,
        "layout": LAYOUT.with_method("x").to_dict(),
        "tensors": [{"name": "a", "dtype": "float16", "shape": shape}],
    }
    raw = msgpack.packb(header)
    payload = bytes(64)
    return _PREFIX.pack(MAGIC, len(raw), xxhash.xxh3_64_intdigest(raw + payload)) + raw + payload


def _bad_bodies() -> dict[str, tuple[str, str, bytes, int]]:
    entry = encode_bytes(Entry.plain("sec-new", LAYOUT, kv(16, seed=3)))
    flipped = bytearray(entry)
    flipped[-100] ^= 0xFF
    good_kv = kv(16, seed=4)
    wrong_layout = KVLayout(30, 3, 32, torch.float16, 16)  # head_dim 32 in the namespace, 64 in the tensor
    store = {"namespace": NS, "tokens": token_bytes(range(16)), "start": 0}
    unknown_dtype = bytearray(_frame({**store}, {"kv": good_kv}))
    at = unknown_dtype.find(b"float16")
    unknown_dtype[at : at + 7] = b"float17"
    return {
        "truncated entry": ("PUT", "/v1/kv/entries/sec-new", entry[: len(entry) // 2], 400),
        "flipped byte": ("PUT", "/v1/kv/entries/sec-new", bytes(flipped), 400),
        "key mismatch": ("PUT", "/v1/kv/entries/sec-other", entry, 400),
        "not an entry": ("PUT", "/v1/kv/entries/sec-new", b"hello world" * 10, 400),
        "bad key chars": ("PUT", "/v1/kv/entries/.hidden", entry, 400),
        "path traversal": ("PUT", "/v1/kv/entries/..%2Fetc", entry, 404),
        "key too long": ("PUT", "/v1/kv/entries/" + "k" * 300, entry, 400),
        "garbage frame": ("POST", "/v1/kv/store", b"\x00" * 64, 400),
        "header not a map": (
            "POST",
            "/v1/kv/store",
            b"KVW1" + (3).to_bytes(4, "little") + msgpack.packb([1]),
            400,
        ),
        "truncated frame": ("POST", "/v1/kv/store", _frame(store, {"kv": good_kv})[:-10], 400),
        "trailing bytes": ("POST", "/v1/kv/store", _frame(store, {"kv": good_kv}) + b"xx", 400),
        "unknown dtype": ("POST", "/v1/kv/store", bytes(unknown_dtype), 400),
        "wrong shape": ("POST", "/v1/kv/store", _frame(store, {"kv": kv(15)}), 400),
        "wrong dtype": ("POST", "/v1/kv/store", _frame(store, {"kv": good_kv.float()}), 400),
        "layout mismatch": (
            "POST",
            "/v1/kv/store",
            _frame({**store, "namespace": {**NS, "layout": wrong_layout.to_dict()}}, {"kv": good_kv}),
            400,
        ),
        "no namespace": (
            "POST",
            "/v1/kv/store",
            _frame({"tokens": token_bytes(range(16))}, {"kv": good_kv}),
            400,
        ),
        "tokens not bytes": ("POST", "/v1/kv/lookup", _frame({"namespace": NS, "tokens": [1, 2, 3]}), 400),
        "odd token bytes": (
            "POST",
            "/v1/kv/lookup",
            _frame({"namespace": NS, "tokens": b"\x01\x02\x03"}),
            400,
        ),
        "bad start": ("POST", "/v1/kv/store", _frame({**store, "start": 5}, {"kv": good_kv}), 400),
        "bad positions": (
            "POST",
            "/v1/kv/store",
            _frame({**store, "positions": b"\x01" * 7}, {"kv": good_kv}),
            400,
        ),
        "huge declared shape": (
            "POST",
            "/v1/kv/segments/put",
            b"KVW1"
            + len(
                h := msgpack.packb(
                    {**store, "tensors": [{"name": "kv", "dtype": "float16", "shape": [1 << 40]}]}
                )
            ).to_bytes(4, "little")
            + h,
            400,
        ),
        "empty tensor with overflowing strides": (
            "POST",
            "/v1/kv/lookup",
            b"KVW1"
            + len(
                h := msgpack.packb(
                    {
                        **store,
                        "tensors": [{"name": "x", "dtype": "float16", "shape": [0, 2**40, 2**40, 2**40]}],
                    }
                )
            ).to_bytes(4, "little")
            + h,
            400,
        ),
        "forged entry shape": (
            "PUT",
            "/v1/kv/entries/sec-new",
            _forged_entry("sec-new", [-2, -2, 4, 1, 4]),
            400,
        ),
        "string pin": (
            "POST",
            "/v1/kv/segments/put",
            _frame({**store, "pin": "false"}, {"kv": good_kv}),
            400,
        ),
        "string partial": ("POST", "/v1/kv/lookup", _frame({**store, "partial": "no"}), 400),
        "bad batch key": ("POST", "/v1/kv/entries/get", _frame({"keys": ["ok", "a/b"]}), 400),
        "one entry per token": (  # a client's chunk size of 1: 100k tokens would be 100k entries
            "POST",
            "/v1/kv/store",
            _frame(
                {
                    "namespace": {**NS, "layout": KVLayout(1, 1, 1, torch.float16, 1).to_dict()},
                    "tokens": token_bytes(range(5000)),
                    "start": 0,
                },
                {"kv": torch.zeros(1, 2, 5000, 1, 1, dtype=torch.float16)},
            ),
            400,
        ),
        "admin json": ("POST", "/v1/admin/evict", b"{not json", 422),
        "admin NaN": ("POST", "/v1/admin/evict", b'{"key": NaN}', 422),  # was a 500 (NaN echoed as JSON)
        "admin extra field": ("POST", "/v1/admin/pin", json.dumps({"key": "x", "oops": 1}).encode(), 422),
    }


@pytest.mark.parametrize("case", list(_bad_bodies()))
def test_bad_input_gets_4xx_and_changes_nothing(secured, keyed, case):
    method, path, body, status = _bad_bodies()[case]
    before = _snapshot(keyed)
    got, detail = _raw(
        secured, method, path, body, {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    )
    assert got == status, detail
    assert _snapshot(keyed) == before
    assert keyed.get("sec-existing") is not None


def test_a_batch_with_one_bad_entry_stores_none(keyed):
    good = [Entry.plain(f"sec-batch-{i}", LAYOUT, kv(4, seed=i)) for i in range(3)]
    parts = [encode_bytes(e) for e in good]
    parts[2] = parts[2][:-1] + bytes([parts[2][-1] ^ 1])  # corrupt the last one
    body = encode_blobs({"pin": False}, [[p] for p in parts])
    with pytest.raises(ValueError, match="checksum"):
        keyed.request("POST", "/v1/kv/entries/put", body)
    assert keyed.lookup([e.key for e in good]) == 0


def test_a_body_shorter_than_announced_stores_nothing(secured, keyed):
    before = _snapshot(keyed)
    entry = encode_bytes(Entry.plain("sec-short", LAYOUT, kv(16)))
    parts = urlsplit(secured.url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = (
            f"PUT /v1/kv/entries/sec-short HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
            f"Content-Length: {len(entry)}\r\n\r\n"
        )
        sock.sendall(head.encode() + entry[:1000])
    assert _snapshot(keyed) == before and keyed.get("sec-short") is None
    time.sleep(0.3)  # the server notices the disconnect: an ordinary refusal, no traceback in its log
    assert "ClientDisconnect" not in secured.log.read_text()


@pytest.mark.parametrize("path", ["/v1/admin/evict", "/v1/semcache/insert", "/v1/kv/entries/sec-gate"])
def test_a_body_without_the_key_is_refused_before_it_is_read(secured, path):
    """FastAPI reads a JSON body before a route's dependencies run: without the gate, a client lacking
    the key could make the server wait for (and hold) up to the body limit. Only the head is sent here:
    the 401 must come without the body."""
    parts = urlsplit(secured.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        method = "PUT" if "entries" in path else "POST"
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall((head + "Content-Length: 900000\r\n\r\n").encode())
        reply = b""
        while b"API key" not in reply and (chunk := sock.recv(4096)):  # head and body may part
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"missing or wrong API key" in reply
