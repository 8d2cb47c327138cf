"""RemoteConnector: KVConnector's interface (`lookup`, `store`, `retrieve`, segments) against a kvfuse server.

The server runs the in-process KVConnector for this connector's namespace, so chunking, keys and skipping
of cached chunks are exactly the in-process ones, and the HF adapter (kvstore/hf.py) works unchanged with
either. Inputs are checked here, before anything is sent, with the same errors as in process. A large
`store` is split into requests of whole chunks of at most `max_request_bytes` each.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.connector import RetrievedKV
from kvstore.format import Entry, decode
from kvstore.http_client import KVClient
from kvstore.keys import Namespace, Tokens, chunk_bounds, token_array
from kvstore.wire import encode_frame, positions_from, raw_bytes, token_bytes


class RemoteConnector:
    """Prefix and segment KV for one namespace in a remote store (`client`: a KVClient or its URL)."""

    def __init__(
        self,
        client: KVClient | str,
        namespace: Namespace,
        store_partial: bool = True,
        max_request_bytes: int = 64 << 20,
        api_key: str | None = None,
    ) -> None:
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace must be a Namespace, got {type(namespace).__name__}")
        if max_request_bytes < namespace.layout.chunk_nbytes(namespace.chunk_tokens):
            raise ValueError(f"max_request_bytes {max_request_bytes} is smaller than one chunk")
        self.client = client if isinstance(client, KVClient) else KVClient(client, api_key=api_key)
        self.namespace = namespace
        self.layout = namespace.layout
        self.store_partial = store_partial
        self.max_request_bytes = max_request_bytes
        self._ns = {
            "model_id": namespace.model_id,
            "layout": namespace.layout.to_dict(),
            "salt": namespace.salt,
        }

    def _header(self, ids: np.ndarray, **fields: object) -> dict:
        return {"namespace": self._ns, "partial": self.store_partial, "tokens": token_bytes(ids), **fields}

    @staticmethod
    def _ids(tokens: Tokens) -> np.ndarray:
        ids = token_array(tokens)
        if len(ids) == 0:
            raise ValueError("token list is empty")
        return ids

    def lookup(self, tokens: Tokens) -> int:
        """Length in tokens of the longest cached prefix of `tokens`; moves nothing."""
        return self.client.frame_call("/v1/kv/lookup", self._header(self._ids(tokens)))[0]["tokens"]

    def store(
        self, tokens: Tokens, kv: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0
    ) -> int:
        """Store the KV of `tokens[start:]` (same contract as KVConnector.store); returns chunks written."""
        ids = self._ids(tokens)
        n, chunk = len(ids), self.layout.chunk_tokens
        if not isinstance(start, int) or start < 0 or start % chunk or start >= n:
            raise ValueError(f"start {start!r} must be a multiple of {chunk} in [0, {n})")
        self.layout.check_kv(kv, tokens=n - start)
        positions = _checked_positions(positions, n - start, start)
        stored = 0
        for s, e in self._pieces(start, n):
            header = self._header(
                ids[:e], start=s, positions=raw_bytes(positions[s - start : e - start]).tobytes()
            )
            piece = kv[:, :, s - start : e - start].contiguous()
            stored += self.client.frame_call("/v1/kv/store", header, {"kv": piece})[0]["stored"]
        return stored

    def _pieces(self, start: int, n: int) -> list[tuple[int, int]]:
        """[s, e) token ranges of whole chunks, each request at most max_request_bytes of KV."""
        per_request = max(1, self.max_request_bytes // self.layout.chunk_nbytes(self.layout.chunk_tokens))
        bounds = chunk_bounds(n, self.layout.chunk_tokens)[start // self.layout.chunk_tokens :]
        return [
            (bounds[i][0], bounds[min(i + per_request, len(bounds)) - 1][1])
            for i in range(0, len(bounds), per_request)
        ]

    def retrieve(self, tokens: Tokens, device: torch.device | str = "cpu") -> RetrievedKV | None:
        """The KV of the longest cached prefix of `tokens` (None if nothing is cached)."""
        header, tensors = self.client.frame_call("/v1/kv/retrieve", self._header(self._ids(tokens)))
        if not header.get("tokens"):
            return None
        kv = tensors["kv"]
        self.layout.check_kv(kv, tokens=header["tokens"])
        positions = positions_from(header.get("positions"))
        if positions is None:
            raise ValueError("the server's retrieve reply has tokens but no positions")
        return RetrievedKV(kv.to(device), positions.to(device))

    def put_segment(
        self, tokens: Tokens, kv: torch.Tensor, positions: torch.Tensor | None = None, pin: bool = False
    ) -> str:
        """Store a passage's KV under its position-free segment key; returns the key."""
        ids = self._ids(tokens)
        self.layout.check_kv(kv, tokens=len(ids))
        positions = _checked_positions(positions, len(ids), 0)
        header = self._header(ids, pin=pin, positions=raw_bytes(positions).tobytes())
        return self.client.frame_call("/v1/kv/segments/put", header, {"kv": kv})[0]["key"]

    def get_segment(self, tokens: Tokens) -> Entry | None:
        """A passage's entry (kv, positions it was computed at), or None; checksum and key verified."""
        ids = self._ids(tokens)
        try:
            reply = self.client.request("POST", "/v1/kv/segments/get", encode_frame(self._header(ids)))
        except KeyError:
            return None
        return decode(reply.body, expect_key=self.namespace.segment_key(ids))

    def has_segment(self, tokens: Tokens) -> bool:
        return self.client.frame_call("/v1/kv/segments/has", self._header(self._ids(tokens)))[0]["present"]


def _checked_positions(positions: torch.Tensor | None, n: int, offset: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(offset, offset + n, dtype=torch.int64)
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
        raise TypeError(f"positions must be an int64 tensor, got {positions!r:.80}")
    if tuple(positions.shape) != (n,):
        raise ValueError(f"positions shape {tuple(positions.shape)} does not match {n} tokens")
    return positions.cpu().contiguous()
