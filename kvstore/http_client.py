"""KVClient: a kvfuse server over HTTP (stdlib http.client, one keep-alive connection per thread).

Data plane: whole entries (`get`, `put`, `get_many`, `put_many`, `lookup`) in the checksummed entry format,
so every get is verified end to end; `frame_call` for the token calls RemoteConnector makes. Admin: the
`/v1/admin` calls (stats, health, entries, inspect, lookup_tokens, evict, clear, pin, unpin, config).

Errors: 400/413/422 -> ValueError with the server's message, 401/403 -> PermissionError, 404 -> KeyError
(`get` returns None instead), 5xx -> ServerError; an unreachable server -> ConnectionError.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import torch

from kvstore.format import Entry, decode, encode
from kvstore.wire import (
    CONTENT_TYPE,
    ENTRY_CONTENT_TYPE,
    Buffers,
    decode_frame,
    empty_buffer,
    encode_blobs,
    encode_frame,
    split_blobs,
)

_RETRYABLE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_CORK_MIN = 64 << 10  # bodies from this size are sent corked, smaller ones joined to their head


class _OneWrite:
    """http.client sends a request's head and its body in two writes (two packets with TCP_NODELAY,
    two wake-ups of the server); a small bytes body is sent with its head in one."""

    _buffer: list[bytes]

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if not isinstance(message_body, bytes) or encode_chunked:
            super()._send_output(message_body, encode_chunked)  # type: ignore[misc]
            return
        self._buffer.extend((b"", b""))
        head = b"\r\n".join(self._buffer)
        del self._buffer[:]
        self.send(head + message_body)  # type: ignore[attr-defined]


class _HTTPConnection(_OneWrite, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    pass


class ServerError(RuntimeError):
    """The server failed (5xx)."""


@dataclass
class Reply:
    status: int
    content_type: str
    body: memoryview  # writable: tensors decoded from it view it without a copy


class KVClient:
    """Talks to one server at `url` (http://host:port), sending `api_key` when given. Thread-safe."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 60.0
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server url must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._local = threading.local()

    # ---- transport -------------------------------------------------------------------------------

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        cls = _HTTPSConnection if self._scheme == "https" else _HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Buffers | bytes | None = None,
        content_type: str | None = None,
        out: memoryview | None = None,
    ) -> Reply:
        """One request; raises for any status >= 400 (see the module docstring). A successful reply's
        body is received into `out` when it fits (memory used before: no page faults), else into a
        new buffer."""
        buffers = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body or [])
        reused = getattr(self._local, "conn", None) is not None
        try:
            reply = self._exchange(self._connection(), method, path, buffers, content_type, out)
        except _RETRYABLE:
            if not reused:
                raise
            # the server closed an idle keep-alive connection: nothing was processed, send again
            reply = self._exchange(self._connection(fresh=True), method, path, buffers, content_type, out)
        except OSError:
            self.close()
            raise
        _raise_for(reply, method, path)
        return reply

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        buffers: list,
        content_type: str | None,
        out: memoryview | None,
    ) -> Reply:
        size = sum(len(b) for b in buffers)
        # A large body goes out corked (head and small parts in full packets, not one packet and wake-up
        # each); a small one is joined to its head and sent at once: uncorking pushes the data through
        # the loopback stack inside the setsockopt, which costs more than the copy of a small body.
        corked = size >= _CORK_MIN
        if corked:
            _cork(conn.sock, 1)
        conn.putrequest(method, self._base + path, skip_accept_encoding=True)
        if buffers or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(size))
            conn.putheader("Content-Type", content_type or CONTENT_TYPE)
        if self.api_key:
            conn.putheader("X-API-Key", self.api_key)
        if corked:
            conn.endheaders()
            for buf in buffers:
                conn.send(buf)
            _cork(conn.sock, 0)
        else:
            conn.endheaders(b"".join(buffers) if buffers else None)
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheader("content-type", ""), _read(resp, out))

    def frame_call(
        self, path: str, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """POST a frame, decode the frame that comes back."""
        return decode_frame(self.request("POST", path, encode_frame(header, tensors)).body)

    def json_call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        if params:
            path += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        reply = self.request(method, path, data, "application/json" if data is not None else None)
        return json.loads(bytes(reply.body)) if reply.body else None

    # ---- entries ----------------------------------------------------------------------------------

    def get(self, key: str, out: memoryview | None = None) -> Entry | None:
        """The entry (checksum and key verified), or None. `out`: a writable buffer to receive it into
        when it fits (the entry's tensors then view `out`: reuse it only when done with them)."""
        try:
            reply = self.request("GET", f"/v1/kv/entries/{quote(key, safe='')}", out=out)
        except KeyError:
            return None
        return decode(reply.body, expect_key=key)

    def put(self, entry: Entry, pin: bool = False) -> None:
        path = f"/v1/kv/entries/{quote(entry.key, safe='')}" + ("?pin=true" if pin else "")
        self.request("PUT", path, encode(entry), ENTRY_CONTENT_TYPE)

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """Entries for `keys` in one round trip (None where absent), each verified."""
        header, tensors = self.frame_call("/v1/kv/entries/get", {"keys": keys})
        blobs = split_blobs(header, tensors, len(keys))
        return [None if b is None else decode(b, expect_key=k) for k, b in zip(keys, blobs, strict=True)]

    def put_many(self, entries: list[Entry], pin: bool = False) -> int:
        """Store `entries` in one round trip; a bad one rejects the whole batch. Returns how many."""
        body = encode_blobs({"pin": pin}, [encode(e) for e in entries])
        return decode_frame(self.request("POST", "/v1/kv/entries/put", body).body)[0]["stored"]

    def lookup(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, are stored (moves nothing)."""
        return self.frame_call("/v1/kv/lookup", {"keys": keys})[0]["chunks"]

    def contains(self, key: str) -> bool:
        return self.lookup([key]) == 1

    # ---- admin ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self.json_call("GET", "/v1/admin/stats")

    def health(self) -> dict[str, Any]:
        return self.json_call("GET", "/v1/admin/health")

    def entries(self, offset: int = 0, limit: int = 100, prefix: str = "") -> dict[str, Any]:
        return self.json_call(
            "GET", "/v1/admin/entries", params={"offset": offset, "limit": limit, "prefix": prefix}
        )

    def inspect(self, key: str) -> dict[str, Any]:
        return self.json_call("GET", f"/v1/admin/entries/{quote(key, safe='')}")

    def lookup_tokens(self, namespace: dict[str, Any], tokens: list[int]) -> int:
        return self.json_call("POST", "/v1/admin/lookup", {"namespace": namespace, "tokens": tokens})[
            "tokens"
        ]

    def evict(self, key: str | None = None, prefix: str | None = None) -> int:
        body = {"key": key} if key is not None else {"prefix": prefix}
        return self.json_call("POST", "/v1/admin/evict", body)["removed"]

    def clear(self, tier: str | None = None) -> dict[str, Any]:
        return self.json_call("POST", "/v1/admin/clear", {"tier": tier})

    def pin(self, key: str) -> None:
        self.json_call("POST", "/v1/admin/pin", {"key": key})

    def unpin(self, key: str) -> None:
        self.json_call("POST", "/v1/admin/unpin", {"key": key})

    def config(self) -> dict[str, Any]:
        return self.json_call("GET", "/v1/admin/config")

    def set_config(self, **changes: Any) -> dict[str, Any]:
        return self.json_call("PATCH", "/v1/admin/config", changes)


_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux


def _cork(sock: socket.socket | None, on: int) -> None:
    if _TCP_CORK is not None and sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)


def _read(resp: http.client.HTTPResponse, out: memoryview | None = None) -> memoryview:
    """The whole response body, received straight into one writable buffer: `out` when it fits and the
    status is a success, else a new one (on huge pages when large: see kvstore.wire.empty_buffer)."""
    if resp.length is None:
        return memoryview(bytearray(resp.read()))
    if out is not None and resp.status < 400 and resp.length <= out.nbytes:
        view = memoryview(out).cast("B")[: resp.length]
    else:
        view = empty_buffer(resp.length).data
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            raise ConnectionError(f"response truncated: {got} of {len(view)} bytes")
        got += n
    return view


def _raise_for(reply: Reply, method: str, path: str) -> None:
    if reply.status < 400:
        return
    detail = _detail(reply)
    where = f"{method} {path.split('?')[0]}"
    if reply.status == 404:
        raise KeyError(detail)
    if reply.status in (401, 403):
        raise PermissionError(f"{where}: {detail}")
    if reply.status >= 500:
        raise ServerError(f"{where}: HTTP {reply.status}: {detail}")
    raise ValueError(f"{where}: HTTP {reply.status}: {detail}")


def _detail(reply: Reply) -> str:
    try:
        detail = json.loads(bytes(reply.body)).get("detail", "")
    except (ValueError, AttributeError):
        return bytes(reply.body[:500]).decode(errors="replace")
    return detail if isinstance(detail, str) else json.dumps(detail)
