"""Stable keys: prefix-chunk keys (chained) and segment keys (position-free), under a namespace.

Keys are cryptographic hashes (blake2b), never Python's `hash()`, so the same tokens give the same key in
every process and after a restart. The namespace (model id, KVLayout, optional salt for a tenant or an
adapter) keys the hash, so two models, dtypes, chunk sizes, compressors or tenants never collide.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from kvstore.layout import KVLayout

KEY_BYTES = 16  # 128-bit keys: collisions are out of reach, and hex keys stay short for files and Redis
_PREFIX_TAG = b"kvfuse-prefix"
_SEGMENT_TAG = b"kvfuse-segment"

Tokens = Sequence[int] | np.ndarray | torch.Tensor


def token_array(tokens: Tokens) -> np.ndarray:
    """Token ids as a 1-D little-endian uint32 array (the bytes that are hashed).

    TypeError for non-integer input, ValueError for negative or too-large ids or a non-1-D shape.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        return _checked_array(tokens)
    try:
        # array.array converts a list of Python ints about as fast as numpy and rejects negatives itself.
        return np.frombuffer(array.array("I", tokens), dtype=np.uint32).astype("<u4", copy=False)
    except OverflowError:
        raise ValueError("token ids must be in [0, 2**32)") from None
    except TypeError:
        raise TypeError(f"token ids must be a sequence of ints, got {type(tokens).__name__}") from None


def _checked_array(tokens: np.ndarray) -> np.ndarray:
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    return tokens.astype("<u4", copy=False)


@dataclass(frozen=True)
class Namespace:
    """Who the KV belongs to: model id + layout + optional salt (tenant, LoRA adapter, ...)."""

    model_id: str
    layout: KVLayout
    salt: str = ""
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"Namespace.model_id must be a non-empty str, got {self.model_id!r}")
        if not isinstance(self.layout, KVLayout):
            raise TypeError(f"Namespace.layout must be a KVLayout, got {type(self.layout).__name__}")
        if not isinstance(self.salt, str):
            raise TypeError(f"Namespace.salt must be a str, got {type(self.salt).__name__}")
        desc = msgpack.packb([self.model_id, self.layout.to_dict(), self.salt])
        object.__setattr__(self, "digest", hashlib.blake2b(desc, digest_size=32).digest())

    @property
    def chunk_tokens(self) -> int:
        return self.layout.chunk_tokens

    def chunk_keys(self, tokens: Tokens, partial: bool = True) -> list[str]:
        """Keys of the chunks of `tokens`: chunk i hashes (namespace, key of chunk i-1, its token ids).

        With `partial` the last, shorter chunk gets a key too; otherwise only full chunks do.
        """
        ids = token_array(tokens)
        n = self.chunk_tokens
        end = len(ids) if partial else len(ids) - len(ids) % n
        keys, prev = [], b""
        for start in range(0, end, n):
            h = hashlib.blake2b(prev, digest_size=KEY_BYTES, key=self.digest, person=_PREFIX_TAG)
            h.update(ids[start : min(start + n, end)].data)
            prev = h.digest()
            keys.append(prev.hex())
        return keys

    def segment_key(self, tokens: Tokens) -> str:
        """Position-free key of a passage: (namespace, its token ids) alone, so it matches anywhere."""
        ids = token_array(tokens)
        if len(ids) == 0:
            raise ValueError("a segment needs at least one token")
        h = hashlib.blake2b(ids.data, digest_size=KEY_BYTES, key=self.digest, person=_SEGMENT_TAG)
        return h.hexdigest()


def chunk_bounds(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of a `num_tokens` prompt, the last one possibly shorter."""
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]
