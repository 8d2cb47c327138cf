"""One stored entry and its bytes: a small msgpack header plus raw tensor bytes. No pickle.

Byte layout (all integers little-endian):

    b"KVF1" | header_len: u32 | checksum: u64 | header (msgpack, header_len bytes) | payload

`checksum` is xxh3-64 over header + payload, so a torn or flipped byte anywhere is caught on read.
The header is a map: `key`, `layout` (KVLayout.to_dict), `tensors` (a list of {name, dtype, shape} in
payload order), `positions` (int64 bytes or nil), `meta` (small user map). New header fields may be added
freely: readers ignore what they do not know, so a compressor can add named tensors or metadata without
a format change.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import xxhash

from kvstore.layout import PLAIN, KVLayout, dtype_from_name, dtype_name
from kvstore.wire import check_shape, raw_bytes

MAGIC = b"KVF1"
_PREFIX = struct.Struct("<4sIQ")
PREFIX_BYTES = _PREFIX.size
KV = "kv"  # the name of the single tensor of a plain entry


class CorruptEntry(ValueError):
    """The bytes are not a valid entry (truncated, flipped, wrong key, or not an entry at all)."""


@dataclass
class Entry:
    """One cached unit: a prefix chunk or a segment.

    `tensors` maps names to contiguous CPU or device tensors; a plain entry has one tensor "kv" of shape
    `[layers, 2, tokens, kv_heads, head_dim]`. `positions` (int64 `[tokens]`) are the positions the keys
    were rotated at (keys are stored post-RoPE). `meta` is a small msgpack-able map for extras.
    """

    key: str
    layout: KVLayout
    tensors: dict[str, torch.Tensor]
    positions: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # True for the store's own copies (host tier), whose tensors nothing writes once stored: encode()
    # then hashes the entry once and reuses the checksum for every later get, demotion or write.
    frozen: bool = field(default=False, compare=False, repr=False)
    _checksum: tuple[bytes, int] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"entry key must be a non-empty str, got {self.key!r}")
        if not self.tensors:
            raise ValueError(f"entry {self.key} has no tensors")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"entry tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            dtype_name(t.dtype)
            if not t.is_contiguous():
                raise ValueError(f"entry tensor {name!r} must be contiguous")
        if self.layout.method == PLAIN:
            if set(self.tensors) != {KV}:
                raise ValueError(f"a plain entry has exactly one tensor 'kv', got {sorted(self.tensors)}")
            self.layout.check_kv(self.tensors[KV])
        if self.positions is not None:
            self._check_positions()
        if not isinstance(self.meta, dict) or not all(isinstance(k, str) for k in self.meta):
            raise TypeError(f"entry meta must be a map with str keys, got {self.meta!r:.80}")

    def _check_positions(self) -> None:
        p = self.positions
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.dtype != torch.int64:
            raise TypeError(f"positions must be a 1-D int64 tensor, got {p!r:.80}")
        if self.layout.method == PLAIN and p.numel() != self.num_tokens:
            raise ValueError(f"{p.numel()} positions for {self.num_tokens} tokens")

    @classmethod
    def plain(
        cls, key: str, layout: KVLayout, kv: torch.Tensor, positions: torch.Tensor | None = None, **meta: Any
    ) -> Entry:
        """A plain entry holding `kv` ([layers, 2, tokens, kv_heads, head_dim]) as is (no copy)."""
        return cls(key, layout, {KV: kv}, positions, dict(meta))

    @classmethod
    def trusted(
        cls,
        key: str,
        layout: KVLayout,
        tensors: dict[str, torch.Tensor],
        positions: torch.Tensor | None,
        meta: dict[str, Any],
        frozen: bool = False,
    ) -> Entry:
        """An entry built without the checks, for copies of an entry that passed them (the host tier's
        stored copies: the checks cost more than a put's bookkeeping)."""
        entry = object.__new__(cls)
        entry.__dict__.update(
            key=key, layout=layout, tensors=tensors, positions=positions, meta=meta, frozen=frozen
        )
        return entry

    @property
    def kv(self) -> torch.Tensor:
        return self.tensors[KV]

    @property
    def num_tokens(self) -> int:
        """Tokens covered: from the plain tensor, else from positions or meta["num_tokens"]."""
        if KV in self.tensors:
            return int(self.tensors[KV].shape[2])
        if self.positions is not None:
            return int(self.positions.numel())
        return int(self.meta.get("num_tokens", 0))

    @property
    def nbytes(self) -> int:
        """Bytes this entry occupies in a memory tier (tensors + positions)."""
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + (self.positions.numel() * 8 if self.positions is not None else 0)

    def to(self, device: torch.device, copy: bool = True) -> Entry:
        """The same entry with tensors on `device`; a deep copy unless `copy` is False."""
        move = (lambda t: t.to(device, copy=True)) if copy else (lambda t: t.to(device))
        tensors = {name: move(t) for name, t in self.tensors.items()}
        positions = None if self.positions is None else move(self.positions)
        # not copied: the same bytes nobody writes, so a frozen entry's verified checksum still holds
        frozen = self.frozen and not copy
        moved = Entry(self.key, self.layout, tensors, positions, dict(self.meta), frozen=frozen)
        if frozen:
            moved._checksum = self._checksum
        return moved


def _header(entry: Entry) -> bytes:
    return msgpack.packb(
        {
            "key": entry.key,
            "layout": entry.layout.to_dict(),
            "tensors": [
                {"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                for n, t in entry.tensors.items()
            ],
            "positions": None if entry.positions is None else raw_bytes(entry.positions).tobytes(),
            "meta": entry.meta,
        }
    )


def encoded_nbytes(entry: Entry) -> int:
    """Exact size of encode(entry) without hashing the payload (to make room before writing)."""
    return (
        PREFIX_BYTES + len(_header(entry)) + sum(t.numel() * t.element_size() for t in entry.tensors.values())
    )


def encode(entry: Entry) -> list[bytes | memoryview]:
    """The entry as a list of buffers (prefix, header, one per tensor) to write without joining."""
    header = _header(entry)
    payload = [raw_bytes(t) for t in entry.tensors.values()]
    return [_PREFIX.pack(MAGIC, len(header), _checksum(entry, header, payload)), header, *payload]


def prefix_checksum(prefix: bytes | memoryview) -> int:
    """The checksum an encoded entry's prefix (the first buffer `encode` returns) carries."""
    return _PREFIX.unpack_from(prefix)[2]


def _checksum(entry: Entry, header: bytes, payload: list[memoryview]) -> int:
    """xxh3-64 of header + payload; a frozen entry's is computed once (a 5.6 MiB chunk costs ~0.3 ms,
    a tenth of serving it over HTTP). Kept with its header bytes, so a changed header is hashed anew."""
    cached = entry._checksum
    if entry.frozen and cached is not None and cached[0] == header:
        return cached[1]
    h = xxhash.xxh3_64(header)
    for part in payload:
        h.update(part)
    digest = h.intdigest()
    if entry.frozen:
        entry._checksum = (header, digest)
    return digest


def encode_bytes(entry: Entry) -> bytes:
    """The entry as one bytes object (for Redis and HTTP bodies)."""
    return b"".join(encode(entry))


def decode(
    buf: bytes | bytearray | memoryview,
    expect_key: str | None = None,
    checksum: int | None = None,
    frozen: bool = False,
) -> Entry:
    """Parse and verify an entry; CorruptEntry (a ValueError) on any mismatch, never wrong data.

    Tensors share memory with a writable `buf` (zero copy); a read-only `buf` (bytes) is copied.
    `checksum`: xxh3-64 of `buf[PREFIX_BYTES:]` already computed by the caller (the disk tier hashes a
    file as it reads it); compared instead of hashing the buffer again. `frozen`: the caller owns `buf` and nothing writes it while the entry lives (a
    server's request body), so the verified checksum is kept: the store's copy is never hashed again.
    """
    view = memoryview(buf).cast("B")
    header, body_at = _read_header(view, checksum)
    tensors, end = _read_tensors(view, header, body_at)
    if end != len(view):
        raise CorruptEntry(f"entry {header.get('key')!r}: {len(view) - end} trailing bytes")
    key = header.get("key", "")
    if expect_key is not None and key != expect_key:
        raise CorruptEntry(f"entry holds key {key!r}, expected {expect_key!r}")
    try:
        layout = KVLayout.from_dict(header["layout"])
        positions = _positions(header.get("positions"))
        entry = Entry(key, layout, tensors, positions, header.get("meta") or {}, frozen=frozen)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptEntry(f"entry {key!r} has an invalid header: {e}") from e
    if frozen:
        _, header_len, stored = _PREFIX.unpack_from(view)
        entry._checksum = (bytes(view[PREFIX_BYTES : PREFIX_BYTES + header_len]), stored)
    return entry


def _read_header(view: memoryview, checksum: int | None = None) -> tuple[dict[str, Any], int]:
    if len(view) < PREFIX_BYTES:
        raise CorruptEntry(f"entry truncated: {len(view)} bytes, need at least {PREFIX_BYTES}")
    magic, header_len, stored = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptEntry(f"not a kvfuse entry (magic {bytes(magic)!r})")
    if PREFIX_BYTES + header_len > len(view):
        raise CorruptEntry(f"entry truncated inside its {header_len}-byte header")
    if checksum is None:
        checksum = xxhash.xxh3_64_intdigest(view[PREFIX_BYTES:])
    if checksum != stored:
        raise CorruptEntry("entry checksum mismatch (torn write or corrupted bytes)")
    try:
        header = msgpack.unpackb(view[PREFIX_BYTES : PREFIX_BYTES + header_len])
    except Exception as e:
        raise CorruptEntry(f"entry header is not msgpack: {e}") from e
    if not isinstance(header, dict):
        raise CorruptEntry(f"entry header is a {type(header).__name__}, expected a map")
    return header, PREFIX_BYTES + header_len


def read_header(prefix: bytes, read: Callable[[int], bytes]) -> dict[str, Any]:
    """The header of an entry from its first PREFIX_BYTES and a reader for the rest (checksum not
    verified: for listing only, never for serving data)."""
    if len(prefix) < PREFIX_BYTES:
        raise CorruptEntry(f"entry truncated: {len(prefix)} bytes, need at least {PREFIX_BYTES}")
    magic, header_len, _ = _PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise CorruptEntry(f"not a kvfuse entry (magic {bytes(magic)!r})")
    try:
        header = msgpack.unpackb(read(header_len))
    except Exception as e:
        raise CorruptEntry(f"entry header is not msgpack: {e}") from e
    if not isinstance(header, dict):
        raise CorruptEntry(f"entry header is a {type(header).__name__}, expected a map")
    return header


def _read_tensors(view: memoryview, header: dict[str, Any], at: int) -> tuple[dict[str, torch.Tensor], int]:
    tensors = {}
    copy = view.readonly
    specs = header.get("tensors") or []
    if not isinstance(specs, list):
        raise CorruptEntry(f"entry 'tensors' must be a list of descriptions, got {type(specs).__name__}")
    for spec in specs:
        try:
            name = spec["name"]
            dtype = dtype_from_name(spec["dtype"])
            shape = check_shape(name, spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptEntry(f"bad tensor description {spec!r:.200}: {e}") from e
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dtype.itemsize
        if at + nbytes > len(view):
            raise CorruptEntry(f"tensor {name!r} truncated: needs {nbytes} bytes at offset {at}")
        tensors[name] = _tensor(view[at : at + nbytes], dtype, shape, copy)
        at += nbytes
    return tensors, at


def _tensor(raw: memoryview, dtype: torch.dtype, shape: list[int], copy: bool) -> torch.Tensor:
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    if not copy:  # a writable buffer (no warning to silence: catching them cost ~10 us per tensor)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are cloned before anyone can write
        t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
    return t.clone()


def _positions(raw: bytes | None) -> torch.Tensor | None:
    if raw is None:
        return None
    if len(raw) % 8:
        raise ValueError(f"positions are {len(raw)} bytes, not a multiple of 8")
    return torch.frombuffer(bytearray(raw), dtype=torch.int64) if raw else torch.empty(0, dtype=torch.int64)
