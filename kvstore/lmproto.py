"""LMCache's lm:// wire format (see shared/specs/store.md) and how its values become store entries.

Client header `"iiiiiiiii150s"` (186 bytes): command, length, fmt, dtype, location, shape0..3, key (UTF-8,
space-padded). Server reply `"iiiiiiiii"` (36 bytes): code, length, fmt, dtype, shape0..3, location (last).
Native byte order, as LMCache's own `struct` calls use.

A value is stored as an entry of the "lmcache" layout: its bytes as one uint8 tensor plus the header
fields in `meta`, so a GET echoes exactly what the PUT sent. LMCache keys (`model@world@worker@hash@dtype`)
may contain "/" and are up to 150 bytes, so the store key is a hash of them (`lm-<32 hex>`); the original
key is kept in `meta["lm_key"]` for the admin API.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from kvstore.format import Entry
from kvstore.layout import KVLayout

CLIENT = struct.Struct("iiiiiiiii150s")
REPLY = struct.Struct("iiiiiiiii")
KEY_BYTES = 150
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
COMMANDS = {PUT: "put", GET: "get", EXIST: "exist", LIST: "list", HEALTH: "health"}
OK, FAIL = 200, 400
# element sizes of LMCache's dtype codes (0 = none: the payload is opaque bytes)
DTYPE_SIZES = {0: 0, 1: 2, 2: 2, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 1}
BINARY_FORMATS = {4, 5}  # MemoryFormat.BINARY / BINARY_BUFFER: shape [length, 0, 0, 0], not a tensor shape
LAYOUT = KVLayout(1, 1, 1, torch.uint8, 1, method="lmcache")
DATA = "data"
# what LMCache's reference server sends for a miss: code 400, fmt 1, float16 (code 2), zero shape
FAIL_REPLY = REPLY.pack(FAIL, 0, 1, 2, 0, 0, 0, 0, 0)
OK_EMPTY_REPLY = REPLY.pack(OK, 0, 1, 2, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Request:
    command: int
    length: int
    fmt: int
    dtype: int
    location: int
    shape: tuple[int, int, int, int]
    key: bytes  # padding stripped, not yet decoded

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> Request:
        command, length, fmt, dtype, location, s0, s1, s2, s3, key = CLIENT.unpack(raw)
        return cls(command, length, fmt, dtype, location, (s0, s1, s2, s3), key.rstrip(b" \x00"))

    def store_key(self) -> str:
        """`lm-` + a 128-bit hash of the LMCache key; ValueError for an empty or non-UTF-8 key."""
        if not self.key:
            raise ValueError("lm:// key is empty")
        self.key.decode("utf-8")  # raises UnicodeDecodeError (a ValueError) for garbage
        return "lm-" + hashlib.blake2b(self.key, digest_size=16).hexdigest()

    def check_value(self) -> None:
        """ValueError unless dtype is known and the shape describes exactly `length` bytes."""
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown lm:// dtype code {self.dtype}; known: {sorted(DTYPE_SIZES)}")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative lm:// shape {self.shape}")
        if self.dtype == 0 or self.fmt in BINARY_FORMATS:
            return
        dims = list(self.shape)
        while len(dims) > 1 and dims[-1] == 0:  # LMCache pads shorter shapes with trailing zeros
            dims.pop()
        count = 1
        for d in dims:
            count *= d
        if count * DTYPE_SIZES[self.dtype] != self.length:
            raise ValueError(
                f"lm:// shape {self.shape} of dtype code {self.dtype} is {count * DTYPE_SIZES[self.dtype]} "
                f"bytes, but the payload is {self.length}"
            )

    def to_entry(self, payload: torch.Tensor) -> Entry:
        """The entry holding `payload` (a uint8 tensor of `length` bytes, kept as is)."""
        meta = {"lm_key": self.key.decode(), "lm": [self.fmt, self.dtype, *self.shape, self.location]}
        return Entry(self.store_key(), LAYOUT, {DATA: payload}, None, meta)


def reply_for(entry: Entry) -> tuple[bytes, memoryview]:
    """The success reply header echoing the PUT's fields, and the value's bytes (no copy)."""
    fmt, dtype, s0, s1, s2, s3, location = entry.meta["lm"]
    data = entry.tensors[DATA]
    raw = data.numpy().data.cast("B")
    return REPLY.pack(OK, len(raw), fmt, dtype, s0, s1, s2, s3, location), raw


def is_lm_entry(entry: Entry) -> bool:
    return entry.layout.method == LAYOUT.method and DATA in entry.tensors and "lm" in entry.meta
