"""A layer-by-layer forward for Llama-family models that reuses the HF modules' weights but owns the loop.

Three things later stages need and HF's forward does not give:
  (a) start from given per-layer K/V (`cache`, at any positions);
  (b) compute only selected rows at a layer (a `LayerHook` sets `step.keep`, or replaces the context K/V);
  (c) swap the attention function per layer (`attention=` one function or a {layer: function} mapping).
With no hook and the default attention it computes what HF's own forward computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.attention import AttentionFn, AttnCall, causal_attention
from engine.kvcache import KVCache, LayerKV
from engine.loader import LoadedModel


@dataclass
class LayerStep:
    """One layer's state for the rows being computed, handed to a `LayerHook` before attention.

    A hook may set `k_ctx`/`v_ctx` (the full context this layer attends over and keeps in the cache;
    default: the cache's rows followed by the new rows) and `keep` (indices of the current rows that
    continue to attention and later layers; default: all).
    """

    layer: int
    hidden: torch.Tensor  # [batch, rows, hidden] residual stream entering the layer
    q: torch.Tensor  # [batch, heads, rows, head_dim], post-RoPE
    k: torch.Tensor  # [batch, kv_heads, rows, head_dim], post-RoPE
    v: torch.Tensor
    positions: torch.Tensor  # [rows]
    q_index: torch.Tensor  # [rows] index of each row in the layer's context
    kv: LayerKV
    k_ctx: torch.Tensor | None = None
    v_ctx: torch.Tensor | None = None
    keep: torch.Tensor | None = None


LayerHook = Callable[[LayerStep], None]


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [batch, rows, vocab] for the requested rows
    cache: KVCache
    rows: torch.Tensor  # [rows_left] which input rows are still computed at the end (all, unless kept)


class Engine:
    """Owns the decoder loop over a loaded HF Llama-family model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.tokenizer = loaded.tokenizer
        base = loaded.model.model
        self.embed_tokens = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = loaded.model.lm_head
        self.scale = self.layers[0].self_attn.scaling

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int = 1) -> KVCache:
        s = self.spec
        return KVCache.empty(s.num_layers, batch, s.num_kv_heads, s.head_dim, s.dtype, self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[1, rows, head_dim]` for the given positions, exactly as the HF model computes them."""
        probe = self.embed_tokens.weight[:1]
        return self.rotary(probe, positions.view(1, -1).to(self.device))

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor | list[int],
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        hook: LayerHook | None = None,
        attention: AttentionFn | Mapping[int, AttentionFn] | None = None,
        logits: str = "last",
    ) -> ForwardOutput:
        """Run `ids` after `cache` (mutated in place: it ends holding every layer's context).

        `positions` default to `cache.next_position + arange(rows)`; `logits` is "last", "all" or "none".
        """
        ids = self._as_batch(ids)
        cache = cache if cache is not None else self.new_cache(ids.shape[0])
        past = len(cache)
        rows = ids.shape[1]
        if positions is None:
            positions = torch.arange(rows, device=self.device) + cache.next_position
        positions = positions.to(self.device, torch.long)
        if positions.shape != (rows,):
            raise ValueError(f"positions must have shape ({rows},), got {tuple(positions.shape)}")
        self._check_length(int(positions.max()) + 1)
        q_index = torch.arange(rows, device=self.device) + past
        kept = torch.arange(rows, device=self.device)
        hidden = self.embed_tokens(ids)
        # Every input row has K/V in every layer's context (a hook that replaces the context keeps its
        # length), so the cache's positions grow by exactly the input positions.
        cache.append_positions(positions)
        # RoPE angles depend only on positions: compute them once, not once per layer.
        state = (hidden, positions, *self.rope(positions), q_index, kept)
        for i, kv in enumerate(cache.layers):
            state = self._layer(i, *state, kv, hook, _pick(attention, i))
        hidden, kept = state[0], state[-1]
        return ForwardOutput(self._logits(hidden, logits), cache, kept)

    @torch.inference_mode()
    def generate(
        self,
        ids: torch.Tensor | list[int],
        max_new_tokens: int,
        cache: KVCache | None = None,
        attention: AttentionFn | Mapping[int, AttentionFn] | None = None,
        stop: set[int] | None = None,
    ) -> tuple[list[int], KVCache]:
        """Greedy decoding: prefill `ids` after `cache`, then one token per step. Returns (new ids, cache)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        out = self.forward(ids, cache=cache, attention=attention)
        return self.decode(out.logits[0, -1], out.cache, max_new_tokens, attention, stop)

    @torch.inference_mode()
    def decode(
        self,
        logits: torch.Tensor,
        cache: KVCache,
        max_new_tokens: int,
        attention: AttentionFn | Mapping[int, AttentionFn] | None = None,
        stop: set[int] | None = None,
    ) -> tuple[list[int], KVCache]:
        """Greedy continuation from the next-token `logits` [vocab] over `cache`."""
        stop = self.stop_ids() if stop is None else stop
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            new.append(token)
            if token in stop or len(new) == max_new_tokens:
                break
            logits = self.forward([token], cache=cache, attention=attention).logits[0, -1]
        return new, cache

    def stop_ids(self) -> set[int]:
        eos = self.loaded.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        return {int(e) for e in eos}

    def _as_batch(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.device)
        if ids.numel() == 0:
            raise ValueError(f"token ids must be non-empty, got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.view(1, -1) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"token ids must be a non-empty [tokens] or [batch, tokens], got {tuple(ids.shape)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.spec.vocab_size}), got {int(ids.min())}..{int(ids.max())}"
            )
        return ids.long()

    def _check_length(self, end: int) -> None:
        if end > self.spec.max_positions:
            raise ValueError(
                f"sequence reaches position {end}, beyond the model's context of {self.spec.max_positions} tokens"
            )

    def _logits(self, hidden: torch.Tensor, which: str) -> torch.Tensor:
        if which == "none":
            return hidden.new_empty(0)
        if which == "last":
            hidden = hidden[:, -1:]
        elif which != "all":
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {which!r}")
        return self.lm_head(self.norm(hidden))

    def _layer(self, i, hidden, positions, cos, sin, q_index, kept, kv: LayerKV, hook, attn_fn):
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        b, t, _ = x.shape
        shape = (b, t, -1, self.spec.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        step = LayerStep(i, hidden, q, k, v, positions, q_index, kv)
        if hook is not None:
            hook(step)
        if (step.k_ctx is None) != (step.v_ctx is None):
            raise ValueError(f"layer {i}: a hook set only one of k_ctx/v_ctx; set both or neither")
        if step.k_ctx is None or step.v_ctx is None:
            k_ctx, v_ctx = kv.update(step.k, step.v)
        else:
            k_ctx, v_ctx = step.k_ctx, step.v_ctx
            kv.replace(k_ctx, v_ctx)
        if step.keep is not None:
            keep = step.keep.to(self.device)
            hidden, q, cos, sin = hidden[:, keep], q[:, :, keep], cos[:, keep], sin[:, keep]
            positions, q_index, kept = positions[keep], q_index[keep], kept[keep]
        call = AttnCall(i, q, k_ctx, v_ctx, q_index, positions, self.scale, kv)
        out = attn_fn(call).transpose(1, 2).reshape(b, q.shape[2], -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, positions, cos, sin, q_index, kept


def _pick(attention: AttentionFn | Mapping[int, AttentionFn] | None, layer: int) -> AttentionFn:
    if attention is None:
        return causal_attention
    if isinstance(attention, Mapping):
        return attention.get(layer, causal_attention)
    return attention
