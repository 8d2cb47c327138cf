"""One prompt `[prefix | passages | question]` to next-token logits and a cache, by a named method.

Methods:
  full_prefill   compute everything (the reference).
  full_reuse     cached passages moved to their positions, only the question computed.
  cacheblend     full reuse plus selective recompute (`BlendConfig`).
  ape            APE: passages side by side at the same positions, merged by APE attention (`APEConfig`).
  parallel       APE with T = S = 1 (plain parallel encoding).
The longest stored exact prefix of the prompt is always used as is (prefix caching); the system prefix
is computed and stored when absent, and so is every passage the store lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from blend.ape import APEAttention, APEConfig
from blend.cacheblend import BlendConfig, BlendStats, blend, make_feed
from blend.segments import Placed, ensure_segments
from engine.attention import AttentionFn
from engine.chat import ChatPrompt
from engine.kvcache import KVCache
from engine.runner import Engine
from kvstore.connector import KVConnector

METHODS = ("cacheblend", "full_reuse", "ape", "parallel", "full_prefill")
REUSE = BlendConfig(ratio=0.0, check_layers=())


@dataclass
class Fused:
    logits: torch.Tensor  # [vocab], next token after the prompt
    cache: KVCache
    method: str
    ttft_s: float  # from the call to the first token's logits, loading included
    prompt_tokens: int
    prefix_tokens: int  # rows taken from the exact prefix cache
    reused_passages: int  # passages whose KV came from the store
    computed_passages: int  # passages computed (and stored) because the store lacked them
    stats: BlendStats | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # what decoding must attend with: APE's merge holds for the generated tokens too (None: plain causal)
    decode_attention: AttentionFn | None = None


class Fuser:
    """Fuses prompts for one engine over one connector (whose namespace covers the system prefix)."""

    def __init__(self, engine: Engine, connector: KVConnector) -> None:
        self.engine, self.connector = engine, connector

    def prefix_cache(self, ids: list[int], system: int, limit: int | None = None) -> KVCache:
        """The exact KV of the longest stored prefix of `ids`, cut to at most `limit` rows and at least its
        first `system` rows (the shared system prefix, computed and stored when the store lacks it)."""
        limit = system if limit is None else limit
        # look up `ids` whole: the store keys a prompt's last, partial chunk by its exact length
        found = self.connector.retrieve(ids, device=self.engine.device) if limit > system else None
        if found is None or found.num_tokens < system:
            found = self.connector.retrieve(ids[:system], device=self.engine.device)
        if found is not None and found.num_tokens >= system:
            cache = KVCache.from_chunk(found.kv, found.positions.to(self.engine.device))
            if len(cache) > limit:
                cache.truncate(limit)
            return cache
        cache = self.engine.forward(ids[:system], logits="none").cache
        self.connector.store(ids[:system], cache.to_chunk().cpu(), cache.positions.cpu())
        return cache

    def fuse(
        self,
        prompt: ChatPrompt,
        method: str = "cacheblend",
        blend_config: BlendConfig | None = None,
        ape_config: APEConfig | None = None,
    ) -> Fused:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ids = prompt.ids
        check_length(self.engine, prompt)
        t0 = time.perf_counter()
        if method == "full_prefill":
            out = self.engine.forward(ids)
            return Fused(out.logits[0, -1], out.cache, method, time.perf_counter() - t0, len(ids), 0, 0, 0)
        computed = self._ensure(prompt)
        t0 = time.perf_counter()  # TTFT counts loading and fusing, not the one-off passage encoding
        attention = None
        if method in ("ape", "parallel"):
            ape_cfg = APEConfig(1.0, 1.0) if method == "parallel" else ape_config or APEConfig()
            out, attention = self._ape(prompt, ape_cfg)
            base = len(prompt.prefix)
        else:
            blend_cfg = REUSE if method == "full_reuse" else blend_config or BlendConfig()
            out, base = self._blend(prompt, blend_cfg)
        reused = len(prompt.passages) - len(out.feed.stats.missing) - computed
        return Fused(
            out.logits,
            out.cache,
            method,
            time.perf_counter() - t0,
            len(ids),
            base,
            reused,
            computed,
            out.stats,
            {
                "fetched_bytes": out.feed.stats.fetched_bytes,
                "fetch_s": out.feed.stats.fetch_s,
                "wait_s": out.feed.stats.wait_s,
            },
            attention,
        )

    def _ensure(self, prompt: ChatPrompt) -> int:
        """Compute and store missing passages; returns how many were computed."""
        if not prompt.passages:
            return 0
        prefix = self.prefix_cache(prompt.prefix, len(prompt.prefix))
        had = ensure_segments(self.engine, self.connector, prefix, prompt.passages)
        return had.count(False)

    def _blend(self, prompt: ChatPrompt, config: BlendConfig):
        ids = prompt.ids
        # one row at least is computed: the last one gives the next token's logits
        prefix = self.prefix_cache(ids, len(prompt.prefix), limit=len(ids) - 1)
        base = len(prefix)
        placed = [Placed(s, p) for (s, _), p in zip(prompt.spans()[1:-1], prompt.passages, strict=True)]
        feed = make_feed(self.engine, self.connector, placed, base, len(ids) - base)
        return blend(self.engine, ids, prefix, feed, config), base

    def _ape(self, prompt: ChatPrompt, config: APEConfig):
        p = len(prompt.prefix)
        prefix = self.prefix_cache(prompt.prefix, p)
        placed, row = [], p
        for passage in prompt.passages:
            placed.append(Placed(row, passage, position=p))
            row += len(passage)
        longest = max((len(x) for x in prompt.passages), default=0)
        positions = torch.cat(
            [torch.arange(p, p + len(x)) for x in prompt.passages]
            + [torch.arange(p + longest, p + longest + len(prompt.question))]
        )
        feed = make_feed(self.engine, self.connector, placed, p, len(prompt.ids) - p)
        attention = APEAttention(p, row, config)
        out = blend(self.engine, prompt.ids, prefix, feed, REUSE, positions=positions, attention=attention)
        return out, attention


def check_length(engine: Engine, prompt: ChatPrompt, new_tokens: int = 0) -> None:
    """ValueError naming the part that is too long when the prompt (plus new tokens) exceeds the context."""
    limit = engine.spec.max_positions
    total = len(prompt.ids) + new_tokens
    if total <= limit:
        return
    parts = f"prefix {len(prompt.prefix)}, passages {sum(map(len, prompt.passages))}, question {len(prompt.question)}"
    if len(prompt.question) + len(prompt.prefix) > limit:
        raise ValueError(
            f"the question is {len(prompt.question)} tokens, longer than the model's context of {limit} tokens ({parts})"
        )
    raise ValueError(
        f"the prompt needs {total} tokens ({parts}, new {new_tokens}), beyond the model's context of {limit} tokens"
    )
