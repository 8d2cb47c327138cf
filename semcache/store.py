"""Cached documents (question, answer, metadata, created, expires, embedding) and their stores.

The store is the source of truth: indexes are rebuilt from it. Each store keeps an *epoch* marker;
an index saved under another epoch (or a store whose marker vanished, e.g. a Redis FLUSHALL) is
detected and never trusted. Documents are msgpack maps with the vector as raw float32 bytes: no pickle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
import numpy as np

from semcache.scope import Scope


class StoreUnavailable(ConnectionError):
    """The document store cannot be reached (a dead Redis); the cache misses instead of failing."""


@dataclass
class Entry:
    id: str
    scope: Scope
    question: str
    answer: str
    vector: np.ndarray
    metadata: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    expires: float = float("inf")

    @property
    def nbytes(self) -> int:
        """Document bytes counted against quotas (the 1.5 KB vector is the same for every entry)."""
        meta = json.dumps(self.metadata, separators=(",", ":")) if self.metadata else ""
        return len(self.question.encode()) + len(self.answer.encode()) + len(meta.encode())

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": 1,
                "id": self.id,
                "scope": [self.scope.tenant, self.scope.model, self.scope.category],
                "q": self.question,
                "a": self.answer,
                "m": self.metadata,
                "c": self.created,
                "e": self.expires,
                "vec": np.asarray(self.vector, dtype="<f4").tobytes(),
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        try:
            d = msgpack.unpackb(raw, raw=False)
            tenant, model, category = d["scope"]
            vec = np.frombuffer(d["vec"], dtype="<f4").astype(np.float32)
            return cls(
                id=d["id"],
                scope=Scope(tenant, model, category),
                question=d["q"],
                answer=d["a"],
                vector=vec,
                metadata=d["m"],
                created=float(d["c"]),
                expires=float(d["e"]),
            )
        except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise ValueError(f"corrupt semcache document ({len(raw)} bytes): {exc}") from exc


class DocumentStore(Protocol):
    """What the cache needs from a document store (Redis or local)."""

    def epoch(self) -> str | None: ...
    def ensure_epoch(self) -> str: ...
    def get_settings(self) -> bytes | None: ...
    def log_position(self) -> str: ...
    def read_log(self, after: str, count: int = 10_000) -> tuple[list[tuple[str, list[str]]], str, bool]: ...
    def put_settings(self, raw: bytes) -> None: ...
    def put(self, entry: Entry) -> None: ...
    def wake(self) -> None: ...  # a fetch may follow soon: get ready (best effort, never waits or raises)
    def get_many(self, ids: list[str]) -> tuple[dict[str, Entry], str | None]: ...
    def delete(self, ids: list[str]) -> None: ...
    def scan(self) -> Iterator[Entry]: ...
    def clear(self) -> None: ...
    def describe(self) -> dict: ...
