"""HTTP data-plane bodies: a small msgpack header followed by raw tensor bytes (no JSON floats, no base64).

Byte layout (integers little-endian):

    b"KVW1" | header_len: u32 | header (msgpack map) | tensor bytes, in the order of header["tensors"]

`header["tensors"]` lists `{name, dtype, shape}`; every other header field belongs to the call. Decoding
checks the magic, the header, every dtype and shape and that the body holds exactly the bytes they
describe, before any tensor memory exists; tensors are views of the body (no copy) when it is writable.
Stored entries travel in their own checksummed format (kvstore.format), not in frames.
"""

from __future__ import annotations

import struct
import sys
import threading
import warnings
from typing import Any

import msgpack
import numpy as np
import torch

from kvstore.keys import token_array
from kvstore.layout import dtype_from_name, dtype_name

MAGIC = b"KVW1"
_PREFIX = struct.Struct("<4sI")
CONTENT_TYPE = "application/x-kvfuse-frame"
ENTRY_CONTENT_TYPE = "application/x-kvfuse-entry"
MAX_TENSORS = 16
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 40  # far above any body the server accepts; keeps strides within int64

Buffers = list[bytes | memoryview]

_HUGE = 2 << 20  # x86-64 / arm64 transparent huge page


def empty_buffer(n: int) -> np.ndarray:
    """An uninitialized, writable uint8 array for `n` bytes about to be received (a body, a value).

    Fresh memory costs a page fault per 4 KiB page on first write, more than the copy itself: receiving
    a 5.6 MiB chunk into fresh 4 KiB pages took 2-6 ms of CPU here, into memory used before 0.9 ms. So a
    body of 2 MiB or more starts on a 2 MiB boundary of a larger allocation, which numpy advises as
    transparent huge pages (a handful of faults: 1.2-1.4 ms), when rounding up to whole huge pages
    wastes at most 1/8 of `n`; untouched slack is never resident. Without THP it is a plain allocation.
    """
    raw, start = _allocate(n)
    return raw[start : start + n]


def _allocate(n: int) -> tuple[np.ndarray, int]:
    pad = -n % _HUGE
    if n < _HUGE or pad * 8 > n:
        return np.empty(n, dtype=np.uint8), 0
    raw = np.empty(n + 2 * _HUGE, dtype=np.uint8)  # > 4 MiB: numpy madvises it MADV_HUGEPAGE
    return raw, -raw.ctypes.data % _HUGE


class RecycledBuffers:
    """Receive buffers (`take(n)`, as empty_buffer) that come back for reuse once nothing refers to them.

    Memory used before takes a body at memcpy speed (see empty_buffer). Whether a buffer is still in use
    is read from the reference count of the array that owns the memory: every view of it (a numpy
    slice, a memoryview, a tensor from torch.from_numpy or torch.frombuffer) keeps a reference to it. So a
    stored entry whose tensors view a body keeps that buffer out of reuse for as long as it lives, and a
    body the store copied (the host pool) is reused by the next request. At most `max_bytes` are
    tracked (lent or idle); beyond that, and below `min_bytes`, buffers are plain allocations.
    Thread-safe.
    """

    def __init__(self, max_bytes: int = 64 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes  # smaller bodies: malloc reuses its own memory already
        self._lent: list[tuple[np.ndarray, int]] = []  # (owner, offset of the aligned start)
        self._idle: list[tuple[np.ndarray, int]] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        if n < self.min_bytes:
            return np.empty(n, dtype=np.uint8)
        with self._lock:
            self._collect()
            item = self._fit(n)
            if item is None:
                self._free_idle(n + 2 * _HUGE)
                if self._bytes + n + 2 * _HUGE > self.max_bytes:
                    return empty_buffer(n)
                item = _allocate(n)
                self._bytes += item[0].nbytes
            self._lent.append(item)
        raw, start = item
        return raw[start : start + n]

    def _collect(self) -> None:
        """Move lent buffers nothing else refers to back to idle (under the lock)."""
        lent, self._lent = self._lent, []
        for item in lent:
            # 2 references when free: the tuple's and getrefcount's own argument
            (self._idle if sys.getrefcount(item[0]) <= 2 else self._lent).append(item)

    def _free_idle(self, need: int) -> None:
        """Drop idle buffers, oldest first, until `need` more bytes fit the budget (under the lock):
        buffers of a size no request asks for any more give way to the sizes asked now. Nothing is
        dropped when the lent buffers alone leave no room (the new one is a plain allocation then)."""
        idle = sum(raw.nbytes for raw, _ in self._idle)
        if self._bytes - idle + need > self.max_bytes:
            return
        while self._idle and self._bytes + need > self.max_bytes:
            raw, _ = self._idle.pop(0)
            self._bytes -= raw.nbytes

    @property
    def tracked_bytes(self) -> int:
        """Bytes of the buffers tracked (lent or idle); at most max_bytes."""
        return self._bytes

    def _fit(self, n: int) -> tuple[np.ndarray, int] | None:
        """The smallest idle buffer holding `n` bytes at most twice over (under the lock)."""
        fits = [
            i for i, (raw, start) in enumerate(self._idle) if n <= raw.nbytes - start <= 2 * n + 2 * _HUGE
        ]
        if not fits:
            return None
        return self._idle.pop(min(fits, key=lambda i: self._idle[i][0].nbytes))

    def stats(self) -> tuple[int, int]:
        """(buffers lent, buffers idle) after collecting the released ones."""
        with self._lock:
            self._collect()
            return len(self._lent), len(self._idle)


def encode_frame(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Buffers:
    """The frame as buffers to send without joining (tensors are not copied)."""
    tensors = tensors or {}
    specs = [{"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in tensors.items()]
    packed = msgpack.packb({**header, "tensors": specs})
    return [_PREFIX.pack(MAGIC, len(packed)), packed, *(raw_bytes(t) for t in tensors.values())]


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy (any dtype, including bfloat16 and float8)."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().data.cast("B")


def decode_frame(body: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a frame; ValueError naming what is wrong (truncated, bad dtype, ...)."""
    view = memoryview(body).cast("B")
    header, at = _read_header(view)
    specs = _tensor_specs(header.pop("tensors", []))
    need = sum(nbytes for _, _, _, nbytes in specs)
    if at + need != len(view):
        raise ValueError(f"frame body holds {len(view) - at} tensor bytes, its header describes {need}")
    tensors = {}
    for name, dtype, shape, nbytes in specs:
        tensors[name] = _tensor(view[at : at + nbytes], dtype, shape)
        at += nbytes
    return header, tensors


def _read_header(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < _PREFIX.size:
        raise ValueError(f"frame truncated: {len(view)} bytes, need at least {_PREFIX.size}")
    magic, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"not a kvfuse frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    end = _PREFIX.size + header_len
    if end > len(view):
        raise ValueError(f"frame truncated inside its {header_len}-byte header")
    try:
        header = msgpack.unpackb(view[_PREFIX.size : end])
    except Exception as e:
        raise ValueError(f"frame header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"frame header is a {type(header).__name__}, expected a map")
    return header, end


def _tensor_specs(raw: Any) -> list[tuple[str, torch.dtype, list[int], int]]:
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ValueError(f"frame 'tensors' must be a list of at most {MAX_TENSORS} descriptions")
    specs = []
    for spec in raw:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"bad tensor description {spec!r:.200}")
        shape = check_shape(spec["name"], spec.get("shape"))
        dtype = dtype_from_name(spec.get("dtype"))
        count = 1
        for s in shape:
            count *= s
        specs.append((spec["name"], dtype, shape, count * torch.empty((), dtype=dtype).element_size()))
    return specs


def check_shape(name: str, shape: Any) -> list[int]:
    """A tensor shape from a header: a list of at most MAX_DIMS ints >= 0 whose element count, with
    zero dimensions left out, stays below MAX_ELEMENTS (an empty tensor of huge other dimensions would
    overflow torch's strides); ValueError naming the tensor and the shape otherwise."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ValueError(f"tensor {name!r}: shape {shape!r:.100} must be a list of at most {MAX_DIMS} ints")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r:.100} must hold whole numbers >= 0")
    count = 1
    for s in shape:
        count *= max(s, 1)
    if count > MAX_ELEMENTS:
        raise ValueError(f"tensor {name!r}: shape {shape!r:.100} has more than {MAX_ELEMENTS} elements")
    return shape


def _tensor(raw: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only bodies are cloned below before anyone can write
        t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
    return t.clone() if raw.readonly else t


def token_bytes(tokens: Any) -> bytes:
    """Token ids as little-endian uint32 bytes (what headers carry)."""
    return token_array(tokens).tobytes()


def tokens_from(raw: Any) -> np.ndarray:
    """Token ids from header bytes (uint32 array); ValueError when absent or malformed."""
    if not isinstance(raw, bytes) or not raw or len(raw) % 4:
        raise ValueError("'tokens' must be non-empty uint32 little-endian bytes")
    return np.frombuffer(raw, dtype="<u4")


def positions_from(raw: Any) -> torch.Tensor | None:
    """int64 positions from header bytes (or None)."""
    if raw is None:
        return None
    if not isinstance(raw, bytes) or len(raw) % 8:
        raise ValueError("'positions' must be int64 little-endian bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch.int64) if raw else torch.empty(0, dtype=torch.int64)


def encode_blobs(header: dict[str, Any], blobs: list[Buffers | None]) -> Buffers:
    """A frame carrying several byte strings (e.g. encoded entries) back to back, without joining them.

    They travel as one uint8 tensor "blobs"; `header["sizes"]` gets each one's size (-1 for None).
    """
    sizes = [-1 if b is None else sum(len(part) for part in b) for b in blobs]
    described = torch.empty(sum(s for s in sizes if s > 0), dtype=torch.uint8)  # never sent: only described
    frame = encode_frame({**header, "sizes": sizes}, {"blobs": described})[:2]
    return frame + [part for b in blobs if b is not None for part in b]


def split_blobs(
    header: dict[str, Any], tensors: dict[str, torch.Tensor], max_count: int = 4096
) -> list[memoryview | None]:
    """The byte strings of an `encode_blobs` frame (views, no copies); ValueError when sizes do not add up."""
    sizes, blob = header.get("sizes"), tensors.get("blobs")
    if (
        blob is None
        or blob.dtype != torch.uint8
        or not isinstance(sizes, list)
        or not 1 <= len(sizes) <= max_count
    ):
        raise ValueError(f"a blob frame needs 'sizes' (1 to {max_count} ints) and a uint8 tensor 'blobs'")
    if (
        not all(isinstance(s, int) and s >= -1 for s in sizes)
        or sum(s for s in sizes if s > 0) != blob.numel()
    ):
        raise ValueError(f"'sizes' {sizes!r:.200} do not add up to the {blob.numel()} blob bytes")
    view = blob.numpy().data.cast("B") if blob.numel() else memoryview(b"")
    out: list[memoryview | None] = []
    at = 0
    for size in sizes:
        out.append(None if size < 0 else view[at : at + size])
        at += max(size, 0)
    return out
