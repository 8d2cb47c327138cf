"""ReKV (arXiv 2503.00540): question answering over a long token stream with KV retrieval.

Encoding: the stream is forwarded block by block with sliding-window attention (the first `n_init` tokens
plus the last `n_local`); every finished block's KV goes to the kvstore as one entry per layer, and its
mean key per layer and KV head is kept as the block's representative. Only the window stays resident.

Answering: at each layer, the question's representative query (the mean of its queries) scores the
blocks by dot product with their representative keys (summed over query heads). Both means are taken
over keys/queries rotated back to position 0, so a block is matched by content rather than by its
distance to the question (with post-RoPE means, the recency of a block dominated the score on
SmolLM2-135M: see README "Retrieval"). The top-k blocks are
fetched (through a small LRU of (block, layer) entries) and laid out in time order after the initial
tokens, followed by the unfinished tail of the stream. Keys are re-rotated to contiguous positions
(`blend.rope.RopeShift`), the question is prefilled on that context and the answer decoded from it.
The stream memory is unchanged by a question: more questions, or more stream, can follow.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from blend.rope import RopeShift
from engine.attention import AttnCall, causal_attention
from engine.kvcache import KVCache, LayerKV
from engine.runner import Engine
from kvstore.store import TieredStore
from retrieval.base import Retriever, kv_bytes
from retrieval.offload import Unit


@dataclass
class ReKVConfig:
    """block_tokens: tokens per stored block (a text "frame"). n_init: always-kept first tokens.
    n_local: sliding-window length while encoding (>= block_tokens). top_k: blocks retrieved per layer.
    lru_blocks: (block, layer) entries kept in fast memory between questions (0: none)."""

    block_tokens: int = 64
    n_init: int = 32
    n_local: int = 512
    top_k: int = 8
    lru_blocks: int = 240

    def __post_init__(self) -> None:
        for name in ("block_tokens", "n_local", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ReKVConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("n_init", "lru_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ReKVConfig.{name} must be an int >= 0, got {value!r}")
        if self.n_local < self.block_tokens:
            raise ValueError(f"n_local {self.n_local} must be >= block_tokens {self.block_tokens}")


class ReKV(Retriever):
    """A stream's KV in the store; `encode(ids)` as the stream arrives, `answer(question, n)` any time."""

    method = "rekv"

    def __init__(
        self, engine: Engine, config: ReKVConfig | None = None, store: TieredStore | None = None
    ) -> None:
        self.config = config or ReKVConfig()
        if not isinstance(self.config, ReKVConfig):
            raise TypeError(f"config must be a ReKVConfig, got {type(self.config).__name__}")
        super().__init__(engine, store, block_tokens=self.config.block_tokens)
        self.shift = RopeShift.for_engine(engine)
        self.window = engine.new_cache()
        self.stream_len = 0
        self.block_reps: list[torch.Tensor] = []  # per block: [layers, kv_heads, d] mean keys
        self.block_starts: list[int] = []
        self.last_selection: dict[int, list[int]] = {}  # layer -> block ids of the last question
        self._lru: OrderedDict[tuple[int, int], Unit] = OrderedDict()
        self._answer_bytes = 0

    # ---- bounds and sizes -----------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        """Window while encoding + one answer context + the LRU (question and answer rows excluded)."""
        c = self.config
        window = c.n_init + c.n_local + c.block_tokens
        answer = c.n_init + (c.top_k + 1) * c.block_tokens
        per_layer_token = self.engine.spec.kv_bytes_per_token // self.engine.spec.num_layers
        return (
            window + answer
        ) * self.engine.spec.kv_bytes_per_token + c.lru_blocks * c.block_tokens * per_layer_token

    def resident_bytes(self) -> int:
        lru = sum(u.k.nelement() * u.k.element_size() * 2 for u in self._lru.values())
        return self.window.nbytes() + lru + self._answer_bytes

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts)

    def block_of(self, position: int) -> int:
        """The block holding stream position `position` (-1 for the initial tokens)."""
        if position < self.config.n_init:
            return -1
        return (position - self.config.n_init) // self.config.block_tokens

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, ids: torch.Tensor | list[int]) -> None:
        """Append `ids` to the stream: forward them in block-aligned pieces over the sliding window."""
        ids = torch.as_tensor(ids).view(-1)
        done = 0
        while done < ids.numel():
            piece = ids[done : done + self._piece_room()]
            positions = torch.arange(self.stream_len, self.stream_len + piece.numel())
            self.engine.forward(piece, cache=self.window, positions=positions, logits="none")
            self.stream_len += piece.numel()
            done += piece.numel()
            if self._piece_room() == self.config.block_tokens and self.stream_len > self.config.n_init:
                self._finish_block()
            self._trim()
        self.sync_stats()

    def _piece_room(self) -> int:
        c = self.config
        if self.stream_len < c.n_init:
            return c.n_init - self.stream_len
        return c.block_tokens - (self.stream_len - c.n_init) % c.block_tokens

    def _finish_block(self) -> None:
        n = self.config.block_tokens
        block = self.num_blocks
        positions = self.window.positions[-n:]
        reps = []
        for i, layer in enumerate(self.window.layers):
            k, v = layer.k[0, :, -n:], layer.v[0, :, -n:]
            self.units.put(self.units.key(block, i), Unit(k, v, positions), layer=i, block=block)
            reps.append(self.shift.shift(k, -positions).float().mean(1))
        self.block_reps.append(torch.stack(reps))
        self.block_starts.append(int(positions[0]))

    def _trim(self) -> None:
        """Keep the initial tokens and the last n_local tokens in the window."""
        rows = len(self.window)
        n_init = min(self.config.n_init, rows)
        if rows <= n_init + self.config.n_local:
            return
        keep = torch.cat([torch.arange(n_init), torch.arange(rows - self.config.n_local, rows)])
        keep = keep.to(self.window.positions.device)
        for layer in self.window.layers:
            layer.replace(layer.k[:, :, keep], layer.v[:, :, keep])
        self.window.positions = self.window.positions[keep]

    # ---- answering -----------------------------------------------------------------------------

    def answer(
        self, question: torch.Tensor | list[int], max_new_tokens: int, stop: set[int] | None = None
    ) -> list[int]:
        """Greedy answer to `question` (token ids, e.g. the end of a chat turn) from the stream's KV."""
        if self.stream_len == 0:
            raise ValueError("the stream is empty: encode() some tokens before asking")
        cache = self.answer_cache()
        question = torch.as_tensor(question).view(-1)
        positions = torch.arange(len(cache), len(cache) + question.numel())
        try:
            out = self.engine.forward(question, cache=cache, positions=positions, attention=self.attention)
            new, _ = self.engine.decode(out.logits[0, -1], cache, max_new_tokens, self.attention, stop)
        finally:
            self._answer_bytes = 0
        self.sync_stats()
        return new

    def answer_cache(self) -> KVCache:
        """An empty cache whose layers pull their context in on the question's first forward."""
        n_ctx = self._init_rows() + min(self.config.top_k, self.num_blocks) * self.config.block_tokens
        n_ctx += self._tail_rows()
        layers = [ReKVLayer(self, i, self.window.layers[i]) for i in range(len(self.window.layers))]
        return KVCache(layers, torch.arange(n_ctx, device=self.engine.device))

    def attention(self, call: AttnCall) -> torch.Tensor:
        layer = call.kv
        if not isinstance(layer, ReKVLayer) or layer.owner is not self:
            raise TypeError("ReKV.attention needs a cache from this ReKV's answer_cache()")
        retrieved = layer.pending
        if retrieved:
            with self.timed():
                layer.materialize(self._context(call.layer, call.q, call.q_positions))
        self.count_layer_step(call.layer, retrieved)
        if call.layer == len(self.window.layers) - 1:
            self.sync_stats()
        full = AttnCall(
            call.layer, call.q, layer.k, layer.v, call.q_index, call.q_positions, call.scale, layer
        )
        return causal_attention(full)

    def select(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> list[int]:
        """Top-k block ids (in time order) for query rows `q` `[1, heads, rows, d]` at `positions`."""
        if not self.block_reps:
            return []
        reps = torch.stack([r[layer] for r in self.block_reps])  # [blocks, kv_heads, d]
        rep_q = self.shift.shift(q[0].float(), -positions.cpu()).mean(1)  # [heads, d], position-free
        group = rep_q.shape[0] // reps.shape[1]
        scores = torch.einsum("hd,bhd->b", rep_q, reps.repeat_interleave(group, dim=1))
        top = torch.topk(scores, min(self.config.top_k, len(self.block_reps))).indices
        return sorted(top.tolist())

    def _context(
        self, layer: int, q: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.select(layer, q, positions)
        self.last_selection[layer] = blocks
        self.stats.tokens_selected += len(blocks) * self.config.block_tokens
        win = self.window.layers[layer]
        init, tail = self._init_rows(), self._tail_rows()
        units = [self._fetch(b, layer) for b in blocks]
        k = torch.cat(
            [
                win.k[0, :, :init],
                *(u.k.to(win.k.device) for u in units),
                win.k[0, :, len(self.window) - tail :],
            ],
            1,
        )
        v = torch.cat(
            [
                win.v[0, :, :init],
                *(u.v.to(win.v.device) for u in units),
                win.v[0, :, len(self.window) - tail :],
            ],
            1,
        )
        old = torch.cat(
            [
                self.window.positions[:init],
                *(u.positions for u in units),
                self.window.positions[len(self.window) - tail :],
            ]
        )
        k = self.shift.move(k, old, torch.arange(old.numel()))
        self._answer_bytes += kv_bytes(k, v)
        return k[None], v[None]

    def _fetch(self, block: int, layer: int) -> Unit:
        key = (block, layer)
        unit = self._lru.pop(key, None)
        if unit is None:
            unit = self.units.get(self.units.key(block, layer))
        if self.config.lru_blocks:
            self._lru[key] = unit
            while len(self._lru) > self.config.lru_blocks:
                self._lru.popitem(last=False)
        return unit

    def _init_rows(self) -> int:
        return min(self.config.n_init, self.stream_len)

    def _tail_rows(self) -> int:
        """Stream tokens after the last finished block (still only in the window)."""
        return max(0, self.stream_len - self.config.n_init) % self.config.block_tokens


class ReKVLayer(LayerKV):
    """One layer of an answer cache: holds only the question's rows until `materialize` prepends the
    retrieved context; from then on it is a plain dense layer."""

    def __init__(self, owner: ReKV, index: int, like: LayerKV) -> None:
        blank = like.k[:, :, :0]
        super().__init__(blank, blank)
        self.owner, self.index = owner, index
        self.pending = True

    def materialize(self, context: tuple[torch.Tensor, torch.Tensor]) -> None:
        k, v = context
        self.k, self.v = torch.cat([k, self.k], dim=2), torch.cat([v, self.v], dim=2)
        self.pending = False
