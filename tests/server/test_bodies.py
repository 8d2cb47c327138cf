"""How bodies are received: in one piece (slow senders, Expect: 100-continue), into a caller's buffer,
into receive buffers that are reused only once nothing refers to them."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import torch
from server_helpers import API_KEY, LAYOUT, kv

from kvstore import Entry
from kvstore.format import encode_bytes
from kvstore.wire import RecycledBuffers, empty_buffer


def _address(buffer) -> int:
    return torch.from_numpy(buffer).data_ptr()


def test_recycled_buffers_come_back_only_when_nothing_refers_to_them():
    pool = RecycledBuffers(max_bytes=64 << 20, min_bytes=1 << 20)
    first = pool.take(5 << 20)
    where = _address(first)
    kept = torch.from_numpy(first[100:200])  # a view of a view: holds the memory too
    del first
    second = pool.take(5 << 20)
    assert _address(second) != where and pool.stats() == (2, 0)
    del kept
    assert pool.stats() == (1, 1)
    third = pool.take((5 << 20) - 7)  # a slightly smaller body fits the released buffer
    assert _address(third) == where and len(third) == (5 << 20) - 7
    del second, third
    assert pool.stats() == (0, 2)
    assert len(pool.take(1000)) == 1000 and pool.stats() == (0, 2)  # small: a plain allocation


def test_idle_buffers_give_way_to_the_sizes_asked_now():
    pool = RecycledBuffers(max_bytes=18 << 20, min_bytes=1 << 20)
    small = [pool.take(3 << 20) for _ in range(2)]  # 6 MiB tracked; 12 MiB takes 16 with alignment
    del small  # idle now: 2 buffers of a size nobody asks for below
    assert pool.stats() == (0, 2)
    big = pool.take(12 << 20)  # does not fit the budget beside them: they are dropped, it is tracked
    assert pool.stats() == (1, 0) and pool.tracked_bytes <= pool.max_bytes
    del big


def test_recycled_buffers_stay_within_their_budget():
    pool = RecycledBuffers(max_bytes=20 << 20, min_bytes=1 << 20)
    held = [pool.take(3 << 20) for _ in range(6)]  # 18 MiB: past the budget some are untracked
    lent, idle = pool.stats()
    assert lent < 6 and idle == 0 and all(len(b) == 3 << 20 for b in held)
    del held
    assert pool.stats() == (0, lent)


def test_empty_buffer_is_writable_and_large_ones_start_on_a_huge_page():
    for n in (0, 1000, 3 << 20, (5 << 20) + 123):
        buf = empty_buffer(n)
        assert len(buf) == n and buf.flags.writeable
    assert _address(empty_buffer(6 << 20)) % (2 << 20) == 0


def test_get_into_a_callers_buffer(server):
    client = server.client()
    entry = Entry.plain("bodies-out", LAYOUT, kv(16, seed=5))
    client.put(entry)
    out = memoryview(bytearray(2 << 20))
    got = client.get(entry.key, out=out)
    start = torch.frombuffer(out, dtype=torch.uint8).data_ptr()
    assert torch.equal(got.kv, entry.kv) and start <= got.kv.data_ptr() < start + len(out)
    small = memoryview(bytearray(100))  # too small: received into new memory, still right
    assert torch.equal(client.get(entry.key, out=small).kv, entry.kv)
    assert client.get("bodies-missing", out=out) is None


def _raw_put(
    server, key: str, body: bytes, pieces: int, expect_continue: bool = False, api_key: str | None = None
) -> bytes:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = f"PUT /v1/kv/entries/{key} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        head += f"X-API-Key: {api_key}\r\n" if api_key else ""
        sock.sendall((head + ("Expect: 100-continue\r\n" if expect_continue else "") + "\r\n").encode())
        if expect_continue:
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        step = -(-len(body) // pieces)
        for at in range(0, len(body), step):
            sock.sendall(body[at : at + step])
            time.sleep(0.02)  # each piece arrives on its own
        return sock.recv(1000)


def test_a_body_sent_in_slow_pieces_is_stored_exactly(server):
    entry = Entry.plain("bodies-slow", LAYOUT, kv(16, seed=6))
    reply = _raw_put(server, entry.key, encode_bytes(entry), pieces=7)
    assert reply.startswith(b"HTTP/1.1 201")
    assert torch.equal(server.client().get(entry.key).kv, entry.kv)


def test_expect_100_continue_gets_its_interim_reply(server):
    entry = Entry.plain("bodies-continue", LAYOUT, kv(16, seed=7))
    reply = _raw_put(server, entry.key, encode_bytes(entry), pieces=2, expect_continue=True)
    assert reply.startswith(b"HTTP/1.1 201")
    assert torch.equal(server.client().get(entry.key).kv, entry.kv)


def test_many_puts_in_a_row_each_keep_their_own_bytes(server):
    """Receive buffers are reused between requests: no stored entry may see a later body's bytes."""
    client = server.client()
    entries = [Entry.plain(f"bodies-row-{i}", LAYOUT, kv(48, seed=10 + i)) for i in range(6)]  # 1.1 MiB
    for e in entries:
        client.put(e)
    for e in entries:
        assert torch.equal(client.get(e.key).kv, e.kv)


def test_pipelined_puts_on_one_connection(server):
    """Two requests sent back to back: the second's head follows the first's body in the same stream."""
    entries = [Entry.plain(f"bodies-pipe-{i}", LAYOUT, kv(48, seed=20 + i)) for i in range(2)]
    parts = urlsplit(server.url)
    stream = b""
    for e in entries:
        body = encode_bytes(e)
        stream += (
            f"PUT /v1/kv/entries/{e.key} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        stream += body
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(stream)
        replies = b""
        while replies.count(b"HTTP/1.1 201") < 2:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {replies!r}"
            replies += chunk
    for e in entries:
        assert torch.equal(server.client().get(e.key).kv, e.kv)


def test_uvicorns_own_body_path_when_bulk_bodies_are_off(fresh_server):
    """KVFUSE_BULK_BODIES=false is the escape hatch from our uvicorn protocol: bodies still round-trip,
    in slow pieces too, and the size limit still refuses before reading."""
    server = fresh_server({"KVFUSE_BULK_BODIES": "false", "KVFUSE_MAX_BODY_BYTES": "2MiB"})
    entry = Entry.plain("bodies-plain-path", LAYOUT, kv(48, seed=30))  # 1.1 MiB: a bulk-sized body
    assert _raw_put(server, entry.key, encode_bytes(entry), pieces=5).startswith(b"HTTP/1.1 201")
    assert torch.equal(server.client().get(entry.key).kv, entry.kv)
    big = Entry.plain("bodies-plain-big", LAYOUT, kv(96, seed=31))  # 2.1 MiB: over the limit
    assert _raw_put(server, big.key, encode_bytes(big), pieces=1).startswith(b"HTTP/1.1 413")
    assert server.client().get(big.key) is None


def test_a_body_without_the_api_key_gets_no_receive_buffer(fresh_server):
    """The bulk path takes a buffer of the body's size when the headers arrive: only for a request
    that carries the key, so a client without it cannot make the server hold max_body_bytes."""
    server = fresh_server({"KVFUSE_API_KEY": API_KEY, "KVFUSE_MAX_BODY_BYTES": "16MiB"})
    entry = Entry.plain("bodies-auth", LAYOUT, kv(96, seed=32))  # 2.1 MiB: a tracked buffer size
    body = encode_bytes(entry)
    assert _raw_put(server, entry.key, body, pieces=2).startswith(b"HTTP/1.1 401")
    stats = server.client().stats()["server"]["receive_buffers"]  # stats need no key
    assert stats == {"lent": 0, "idle": 0, "bytes": 0}
    assert _raw_put(server, entry.key, body, pieces=2, api_key=API_KEY).startswith(b"HTTP/1.1 201")
    assert server.client().stats()["server"]["receive_buffers"]["bytes"] >= len(body)
    assert torch.equal(server.client(API_KEY).get(entry.key).kv, entry.kv)
