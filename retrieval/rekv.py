"""ReKV (arXiv 2503.00540): question answering over a long token stream with KV retrieval.

Encoding: the stream is forwarded block by block with sliding-window attention (the first `n_init` tokens
plus the last `n_local`); every finished block's KV goes to the kvstore as one entry per layer, and its
mean key per layer and KV head is kept as the block's representative. Only the window stays resident.

Answering, scoring="keys" (default here): the question runs over the sliding window; its keys at the
index layers (layer 2 by default), rotated back to position 0, are compared by cosine with every stored
token key of those layers (kept resident as a small index: 1/30 of the stream's KV per index layer on
SmolLM2-135M); a block's score is the sum over the question's focus rows and KV heads of its best
token's cosine, z-normalized per index layer, and one top-k serves all layers. Why not the paper's
query-key score: on this model the question's queries are dominated by a question-independent part, so
every question picked the same 8 blocks of a 4K stream (recall 0.33: the two fact blocks among them were
found by any question); per-token query maxima or centred queries did not fix it, while at layers 1-11
the question's keys rank each fact's block first (a lexical-like match), and only at token level: block
or 4-token mean keys lose the fact inside 64 tokens of prose (README "Retrieval").

Answering, scoring="query" (the paper's): the question's representative query at a layer (the mean of its
queries; only the rows in `focus`, e.g. without the chat template's closing tokens) scores the blocks
against their representative keys, summed over query heads. Keys and queries are rotated back to position
0 (as InfLLM/ReKV score un-rotated vectors), so a block is matched by content rather than by its distance
to the question. Two options:
- `representative`: "mean" (the paper's mean key) or "minmax", each block's per-channel min and max key
  scored as `sum_c max(q_c min_c, q_c max_c)` (Quest's bound on the block's best key).
- `selection`: "shared" first runs the question over the sliding window (initial + local tokens, as the
  stream left it) to get every layer's queries, z-normalizes each layer's block scores and picks one
  top-k for all layers; "layer" (the paper's) picks per layer during the answer's prefill.

The top-k blocks are fetched (through a small LRU of (block, layer) entries) and laid out in time order
after the initial tokens, followed by the unfinished tail of the stream. Keys are re-rotated to contiguous
positions (`blend.rope.RopeShift`), the question is prefilled on that context and the answer decoded from it.
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

REPRESENTATIVES = ("minmax", "mean")
SELECTIONS = ("shared", "layer")
SCORINGS = ("keys", "query")


@dataclass
class ReKVConfig:
    """block_tokens: tokens per stored block (a text "frame"). n_init: always-kept first tokens.
    n_local: sliding-window length while encoding (>= block_tokens). top_k: blocks retrieved per layer.
    lru_blocks: (block, layer) entries kept in fast memory between questions (0: none).
    scoring: "keys" (the question's keys vs the stored token keys of `index_layers`, one top-k for all
        layers) or "query" (the paper's: mean question query vs each block's representative key).
    index_layers: layers whose token keys are kept resident as the "keys" index (early layers match
        tokens by identity; measured on SmolLM2-135M: every layer of 1-11 ranks a planted fact's block
        first on a 4K stream).
    representative / selection (scoring="query" only): "mean" (the paper's mean key) or "minmax"
        (per-channel min/max keys, Quest's bound); "shared" (one top-k from all layers' scores) or
        "layer" (top-k per layer, the paper's)."""

    block_tokens: int = 64
    n_init: int = 32
    n_local: int = 512
    top_k: int = 8
    lru_blocks: int = 240
    scoring: str = "keys"
    index_layers: tuple[int, ...] = (2,)
    representative: str = "mean"
    selection: str = "shared"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"ReKVConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        self.index_layers = tuple(self.index_layers)
        if not self.index_layers or any(
            not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.index_layers
        ):
            raise ValueError(f"ReKVConfig.index_layers must be ints >= 0, got {self.index_layers!r}")
        if self.scoring == "keys" and self.selection == "layer":
            raise ValueError('selection="layer" picks per layer by query: it needs scoring="query"')
        if self.representative not in REPRESENTATIVES:
            raise ValueError(
                f"ReKVConfig.representative must be one of {REPRESENTATIVES}, got {self.representative!r}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"ReKVConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
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
        layers = engine.spec.num_layers
        if max(self.config.index_layers) >= layers:
            raise ValueError(
                f"index_layers {self.config.index_layers} out of range for a {layers}-layer model"
            )
        super().__init__(engine, store, block_tokens=self.config.block_tokens)
        self.shift = RopeShift.for_engine(engine)
        self.window = engine.new_cache()
        self.stream_len = 0
        # per block: [layers, reps, kv_heads, d], un-rotated keys' (min, max) or (mean,)
        self.block_reps: list[torch.Tensor] = []
        self.block_starts: list[int] = []
        # scoring="keys": per index layer, per block the unit-norm un-rotated token keys [kv_heads, n, d]
        self.key_index: dict[int, list[torch.Tensor]] = {}
        self.last_selection: dict[int, list[int]] = {}  # layer -> block ids of the last question
        self._lru: OrderedDict[tuple[int, int], Unit] = OrderedDict()
        self._answer_bytes = 0
        self._focus: slice = slice(None)
        self._shared: list[int] | None = None

    # ---- bounds and sizes -----------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        """Window while encoding + one answer context + the LRU (question and answer rows excluded)."""
        c = self.config
        window = c.n_init + c.n_local + c.block_tokens
        answer = c.n_init + (c.top_k + 1) * c.block_tokens
        per_layer_token = self.engine.spec.kv_bytes_per_token // self.engine.spec.num_layers
        return (
            (window + answer) * self.engine.spec.kv_bytes_per_token
            + c.lru_blocks * c.block_tokens * per_layer_token
            + self.index_bytes()
        )

    def index_bytes(self) -> int:
        """The "keys" index: fp32 keys (no values) of the index layers for every stored token. It grows
        with the stream, at len(index_layers) / (2 * layers) of the stream's KV (fp32 KV: 1/60 here)."""
        return sum(t.nelement() * t.element_size() for blocks in self.key_index.values() for t in blocks)

    def resident_bytes(self) -> int:
        lru = sum(u.k.nelement() * u.k.element_size() * 2 for u in self._lru.values())
        return self.window.nbytes() + lru + self._answer_bytes + self.index_bytes()

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
            plain = self.shift.shift(k, -positions).float()
            reps.append(self._representative(plain))
            if self.config.scoring == "keys" and i in self.config.index_layers:
                self.key_index.setdefault(i, []).append(torch.nn.functional.normalize(plain, dim=-1))
        self.block_reps.append(torch.stack(reps))
        self.block_starts.append(int(positions[0]))

    def _representative(self, k: torch.Tensor) -> torch.Tensor:
        """`[reps, kv_heads, d]` of a block's un-rotated keys `[kv_heads, tokens, d]`."""
        if self.config.representative == "mean":
            return k.mean(1)[None]
        return torch.stack([k.amin(1), k.amax(1)])

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
        self,
        question: torch.Tensor | list[int],
        max_new_tokens: int,
        stop: set[int] | None = None,
        focus: slice | None = None,
    ) -> list[int]:
        """Greedy answer to `question` (token ids, e.g. the end of a chat turn) from the stream's KV.

        `focus`: the question rows whose queries pick the blocks (default all; pass the question's own
        words to leave out chat-template tokens, whose queries look the same for every question)."""
        if self.stream_len == 0:
            raise ValueError("the stream is empty: encode() some tokens before asking")
        question = torch.as_tensor(question).view(-1)
        self._focus = self._check_focus(focus, question.numel())
        cache = self.answer_cache()
        positions = torch.arange(len(cache), len(cache) + question.numel())
        try:
            if self.config.scoring == "keys":
                self._shared = self.key_selection(question)
            elif self.config.selection == "shared":
                self._shared = self.shared_selection(question)
            out = self.engine.forward(question, cache=cache, positions=positions, attention=self.attention)
            new, _ = self.engine.decode(out.logits[0, -1], cache, max_new_tokens, self.attention, stop)
        finally:
            self._answer_bytes = 0
            self._shared = None
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
        return self._top(self.block_scores(layer, q, positions))

    def block_scores(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`[blocks]` scores of the blocks at `layer` for the `focus` rows of `q` `[1, heads, rows, d]`."""
        q, positions = q[0, :, self._focus], positions[self._focus]
        rep_q = self.shift.shift(q.float(), -positions.cpu()).mean(1)  # [heads, d], position-free
        reps = torch.stack([r[layer] for r in self.block_reps])  # [blocks, reps, kv_heads, d]
        reps = reps.repeat_interleave(rep_q.shape[0] // reps.shape[2], dim=2)
        per_channel = rep_q * reps  # [blocks, reps, heads, d]
        if self.config.representative == "minmax":
            return per_channel.amax(1).sum((1, 2))
        return per_channel[:, 0].sum((1, 2))

    def key_selection(self, question: torch.Tensor) -> list[int]:
        """One top-k for all layers from `key_scores` (with the current focus rows)."""
        if self.num_blocks <= self.config.top_k:
            return list(range(self.num_blocks))
        return self._top(self.key_scores(question, self._focus))

    def key_scores(self, question: torch.Tensor | list[int], focus: slice | None = None) -> torch.Tensor:
        """`[blocks]` scores from the question's keys at the index layers: per layer and block, the sum
        over `focus` rows and KV heads of the best cosine with one of the block's token keys; the
        layers' scores are z-normalized and summed."""
        question = torch.as_tensor(question).view(-1)
        focus = self._check_focus(focus, question.numel())
        if not self.key_index:
            raise ValueError('no key index: it is built while encoding with scoring="keys"')
        passes = self._question_pass(question, set(self.config.index_layers))
        scores = []
        for i in self.config.index_layers:
            _, positions, k = passes[i]
            rows = self.shift.shift(k[0].float(), -positions.cpu())[:, focus]  # [kv, rows, d]
            rows = torch.nn.functional.normalize(rows, dim=-1)
            index = torch.stack(self.key_index[i])  # [blocks, kv, n, d]
            scores.append(torch.einsum("hrd,bhnd->bhrn", rows, index).amax(3).sum((1, 2)))
        return _zsum(torch.stack(scores))

    def shared_selection(self, question: torch.Tensor) -> list[int]:
        """One top-k for all layers: the question runs over the sliding window (then is dropped from it)
        to give every layer's queries; each layer's block scores are z-normalized and summed."""
        if self.num_blocks <= self.config.top_k:
            return list(range(self.num_blocks))
        passes = self._question_pass(question, set(range(len(self.window.layers))))
        scores = torch.stack([self.block_scores(i, q, pos) for i, (q, pos, _) in sorted(passes.items())])
        return self._top(_zsum(scores))

    def _question_pass(
        self, question: torch.Tensor, layers: set[int]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The question forwarded over the sliding window (then dropped from it): per layer in `layers`,
        its queries, their positions and its own (post-RoPE) keys."""
        seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        n = question.numel()

        def capture(call: AttnCall) -> torch.Tensor:
            if call.layer in layers:
                seen[call.layer] = (call.q, call.q_positions, call.k[:, :, -n:])
            return causal_attention(call)

        rows = len(self.window)
        positions = torch.arange(self.stream_len, self.stream_len + n)
        try:
            self.engine.forward(
                question, cache=self.window, positions=positions, attention=capture, logits="none"
            )
        finally:
            self.window.truncate(rows)
        return seen

    def _top(self, scores: torch.Tensor) -> list[int]:
        return sorted(torch.topk(scores, min(self.config.top_k, scores.numel())).indices.tolist())

    @staticmethod
    def _check_focus(focus: slice | None, rows: int) -> slice:
        if focus is None:
            return slice(None)
        if not isinstance(focus, slice) or focus.step not in (None, 1):
            raise TypeError(f"focus must be a slice of question rows with step 1, got {focus!r}")
        if len(range(rows)[focus]) == 0:
            raise ValueError(f"focus {focus} selects no row of a {rows}-token question")
        return focus

    def _context(
        self, layer: int, q: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self._shared if self._shared is not None else self.select(layer, q, positions)
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


def _zsum(scores: torch.Tensor) -> torch.Tensor:
    """`[layers, blocks]` scores z-normalized per layer (their scales differ a lot), summed over layers."""
    z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp(min=1e-6)
    return z.sum(0)


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
