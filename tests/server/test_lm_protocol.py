"""The lm:// port, driven by a client written from shared/specs/store.md (not from our server's code)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
import torch

# From the spec: client header "iiiiiiiii150s" (186 bytes), reply "iiiiiiiii" (36 bytes, location last).
CLIENT = "iiiiiiiii150s"
REPLY = "iiiiiiiii"
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
FLOAT16, BFLOAT16, FLOAT32 = 2, 3, 4


class LmClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(
        self, command: int, key: str, length: int = 0, fmt: int = 1, dtype: int = FLOAT16, shape=(0, 0, 0, 0)
    ):
        self.sock.sendall(
            struct.pack(CLIENT, command, length, fmt, dtype, 0, *shape, key.encode().ljust(150))
        )

    def reply(self) -> tuple[int, ...]:
        return struct.unpack(REPLY, self.recv(36))

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("server closed the connection")
            buf += part
        return bytes(buf)

    def put(self, key: str, payload: bytes, dtype: int = FLOAT16, shape=(0, 0, 0, 0), fmt: int = 1) -> None:
        self.send(PUT, key, len(payload), fmt, dtype, shape)
        self.sock.sendall(payload)

    def get(self, key: str) -> tuple[tuple[int, ...], bytes]:
        self.send(GET, key)
        header = self.reply()
        return header, self.recv(header[1]) if header[0] == 200 else b""

    def exists(self, key: str) -> bool:
        self.send(EXIST, key)
        return self.reply()[0] == 200


def _value(shape, dtype=torch.float16, seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def lm(server):
    client = LmClient(server.lm_port)
    yield client
    client.close()


def test_health_put_exist_get_are_byte_exact(lm):
    lm.send(HEALTH, "")
    assert lm.reply()[0] == 200
    key = "meta-llama/Llama-3.1-8B@1@0@9f86d081884c7d65@half"  # real LMCache keys contain '/'
    shape = (2, 30, 16, 192)  # [2, layers, tokens, heads*dim], LMCache's KV_2LTD
    payload = _value(shape)
    assert not lm.exists(key)
    lm.put(key, payload, FLOAT16, shape, fmt=1)  # no reply to a PUT
    assert lm.exists(key)
    header, data = lm.get(key)
    assert header == (200, len(payload), 1, FLOAT16, *shape, 0)
    assert data == payload


@pytest.mark.parametrize(("dtype", "torch_dtype"), [(BFLOAT16, torch.bfloat16), (FLOAT32, torch.float32)])
def test_other_dtypes_and_shorter_shapes_are_echoed(lm, dtype, torch_dtype):
    key = f"model@1@0@abc@{dtype}"
    payload = _value((4, 96), torch_dtype, seed=dtype)
    lm.put(key, payload, dtype, (4, 96, 0, 0), fmt=3)
    header, data = lm.get(key)
    assert header == (200, len(payload), 3, dtype, 4, 96, 0, 0, 0) and data == payload


def test_miss_gets_the_spec_fail_reply(lm):
    header, data = lm.get("model@1@0@never-stored@half")
    assert header[0] == 400 and header[1] == 0 and data == b""
    assert not lm.exists("model@1@0@never-stored@half")


def test_put_replaces_the_value(lm):
    key = "model@1@0@replace@half"
    lm.put(key, _value((8,), seed=1), FLOAT16, (8, 0, 0, 0))
    second = _value((16,), seed=2)
    lm.put(key, second, FLOAT16, (16, 0, 0, 0))
    assert lm.get(key)[1] == second


@pytest.mark.parametrize(
    ("label", "dtype", "shape", "length"),
    [
        ("unknown dtype", 42, (8, 0, 0, 0), 16),
        ("shape larger than payload", FLOAT16, (9, 0, 0, 0), 16),
        ("shape smaller than payload", FLOAT16, (2, 2, 0, 0), 16),
        ("negative dim", FLOAT16, (-1, 8, 0, 0), 16),
    ],
)
def test_bad_puts_are_dropped_and_the_connection_goes_on(lm, label, dtype, shape, length):
    key = f"model@1@0@bad-{label.replace(' ', '-')}@half"
    lm.send(PUT, key, length, 1, dtype, shape)
    lm.sock.sendall(b"\x01" * length)
    assert not lm.exists(key)  # still in step: the payload was read and dropped
    lm.send(HEALTH, "")
    assert lm.reply()[0] == 200


def test_oversized_put_is_dropped(fresh_server):
    s = fresh_server({"KVFUSE_MAX_BODY_BYTES": "64KiB"})
    client = LmClient(s.lm_port)
    client.put("model@1@0@big@half", bytes(100_000), 6, (100_000, 0, 0, 0))
    client.put("model@1@0@small@half", bytes(1000), 6, (1000, 0, 0, 0))
    assert not client.exists("model@1@0@big@half") and client.exists("model@1@0@small@half")
    client.close()


def test_empty_key_and_unknown_command(lm, server):
    assert not lm.exists("")
    lm.send(LIST, "anything")
    assert lm.reply()[0] == 400
    with pytest.raises((ConnectionError, OSError)):  # the server stops trusting the stream
        lm.send(HEALTH, "")
        lm.reply()
    fresh = LmClient(server.lm_port)
    fresh.send(HEALTH, "")
    assert fresh.reply()[0] == 200
    fresh.close()


def test_survives_a_client_that_disconnects_mid_put(server):
    key = "model@1@0@torn@half"
    torn = LmClient(server.lm_port)
    torn.send(PUT, key, 1 << 20, 1, 6, (1 << 20, 0, 0, 0))
    torn.sock.sendall(bytes(1000))  # far less than announced
    torn.close()
    torn = LmClient(server.lm_port)
    torn.sock.sendall(struct.pack(CLIENT, GET, 0, 1, 2, 0, 0, 0, 0, 0, b"x")[:50])  # half a header
    torn.close()
    time.sleep(0.2)
    client = LmClient(server.lm_port)
    client.send(HEALTH, "")
    assert client.reply()[0] == 200
    assert not client.exists(key)
    client.put(key, bytes(range(256)) * 4, 6, (1024, 0, 0, 0))
    assert client.get(key)[1] == bytes(range(256)) * 4
    client.close()


def test_values_share_the_store_capacity_and_admin(fresh_server):
    """lm:// values are ordinary entries: bounded by the tiers, evicted (demoted) like any other."""
    s = fresh_server({"KVFUSE_HOST_BYTES": "1MiB", "KVFUSE_DISK_BYTES": "3MiB"})
    client = LmClient(s.lm_port)
    values = {f"model@1@0@cap{i}@half": _value((256, 1024), seed=i) for i in range(8)}  # 512 KiB each
    for key, payload in values.items():
        client.put(key, payload, FLOAT16, (256, 1024, 0, 0))
    client.send(HEALTH, "")
    assert client.reply()[0] == 200
    stats = s.client().stats()["tiers"]
    assert stats["host"]["bytes"] <= 1 << 20 and stats["disk"]["bytes"] <= 3 << 20
    assert stats["host"]["evictions"] >= 6
    held = [k for k in values if client.exists(k)]
    assert 4 <= len(held) < len(values)  # the most recent ones; the oldest were dropped at the bottom
    assert held == list(values)[-len(held) :]
    listing = s.client().entries(prefix="lm-")
    assert listing["total"] == len(held)
    inspected = s.client().inspect(listing["entries"][0]["key"])
    assert inspected["meta"]["lm_key"] in values and inspected["layout"]["method"] == "lmcache"
    # newest first: two host hits, then a disk hit (whose promotion may push older ones out: LRU at work)
    for key in reversed(held[-3:]):
        assert client.get(key)[1] == values[key]
    client.close()


def test_a_planted_entry_under_an_lm_key_is_a_400_not_a_dropped_connection(server, lm):
    """An entry put over HTTP at an lm:// value's store key but with bad lm metadata."""
    import hashlib

    from kvstore import Entry, KVLayout

    key = "model@1@0@planted@half"
    store_key = "lm-" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    layout = KVLayout(1, 1, 1, torch.uint8, 1, method="lmcache")
    for bad in ([1, 2, 3], [1, 2, 2**40, 0, 0, 0, 0]):
        entry = Entry(store_key, layout, {"data": torch.zeros(8, dtype=torch.uint8)}, None, {"lm": bad})
        server.client().put(entry)
        header, _ = lm.get(key)
        assert header[0] == 400
        lm.send(HEALTH, "")  # the connection goes on
        assert lm.reply()[0] == 200


def test_the_value_limit_is_the_live_body_limit(fresh_server):
    s = fresh_server()
    client = LmClient(s.lm_port)
    client.put("model@1@0@before@half", bytes(200_000), 6, (200_000, 0, 0, 0))
    assert client.exists("model@1@0@before@half")
    s.client().set_config(max_body_bytes="128KiB")
    client.put("model@1@0@after@half", bytes(200_000), 6, (200_000, 0, 0, 0))
    assert not client.exists("model@1@0@after@half")  # dropped: over the limit set a moment ago
    client.close()


def test_stalled_puts_are_bounded_and_cut_off():
    """Two clients announce PUTs and stall: with a 1.5-value in-flight budget the second waits for the
    first, which the idle timeout cuts off; then the second is received, and a third client is served."""
    import asyncio
    import threading

    from kvstore import StoreConfig, TieredStore
    from kvstore.lmserver import LmServer

    store = TieredStore(StoreConfig(host_bytes=8 << 20, write_behind=False))
    loop = asyncio.new_event_loop()
    # 1.5 MiB budget, 1 MiB values; a PUT must arrive within 0.5 s + 1 s
    server = LmServer(store, inflight_bytes=3 << 19, idle_timeout_s=0.5, min_rate=1 << 20)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        stalled, waiting = LmClient(server.port), LmClient(server.port)
        stalled.send(PUT, "model@1@0@stalled@half", 1 << 20, 1, 6, (1 << 20, 0, 0, 0))
        stalled.sock.sendall(bytes(1000))
        time.sleep(0.1)
        waiting.send(PUT, "model@1@0@waiting@half", 1 << 20, 1, 6, (1 << 20, 0, 0, 0))
        time.sleep(0.1)
        assert server._inflight == 1 << 20  # the second PUT waits: both would pass the budget
        waiting.sock.sendall(bytes(1 << 20))  # it sends its whole value, as a live client would
        with pytest.raises((ConnectionError, OSError)):  # the stalled one is cut off after 0.5 s
            stalled.recv(1)
        assert waiting.exists("model@1@0@waiting@half")
        assert server._inflight == 0 and not store.contains("lm-stalled")
        fresh = LmClient(server.port)
        fresh.send(HEALTH, "")
        assert fresh.reply()[0] == 200
        # a client trickling a byte every 0.3 s (never idle for 0.5 s) is cut off by the rate floor
        trickler = LmClient(server.port)
        trickler.send(PUT, "model@1@0@trickle@half", 1 << 20, 1, 6, (1 << 20, 0, 0, 0))
        start = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            while time.monotonic() - start < 10:
                trickler.sock.sendall(b"x")
                time.sleep(0.3)
        assert time.monotonic() - start < 5 and server._inflight == 0
        for c in (stalled, waiting, fresh, trickler):
            c.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        store.close()
