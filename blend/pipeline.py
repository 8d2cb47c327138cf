"""The RAG pipeline: ingest documents (passages precomputed once), answer questions by fusing cached KV.

`ingest` cuts documents into passages of about 256-512 tokens, computes each passage's KV behind the
shared system prefix and stores it under its segment key. `answer` takes the given passages (texts or
ingested ids) or the top-k by BM25, fuses them with the question (CacheBlend by default; APE, plain
parallel encoding, full reuse or full prefill on request) and decodes greedily from the fused cache.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from blend.ape import APEConfig
from blend.cacheblend import BlendConfig
from blend.catalog import Catalog, Passage, passage_id
from blend.costmodel import AutoRatio
from blend.fuse import METHODS, Fused, Fuser, check_length
from blend.passages import SplitConfig, split_document
from blend.retriever import BM25
from blend.segments import ensure_segments
from engine.chat import DEFAULT_SYSTEM, ChatPrompt, build_chat, encode, passage_text
from engine.runner import Engine
from kvstore.connector import KVConnector
from kvstore.keys import Namespace
from kvstore.layout import KVLayout
from kvstore.store import TieredStore


@dataclass
class RagConfig:
    method: str = "cacheblend"
    blend: BlendConfig = field(default_factory=BlendConfig)
    ape: APEConfig = field(default_factory=APEConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    top_k: int = 4
    max_new_tokens: int = 64
    system: str = DEFAULT_SYSTEM
    progress: bool = True  # a tqdm bar while ingesting (on stderr)
    # CacheBlend's r: None keeps `blend.ratio`; a number in [0, 1] replaces it; "auto" takes
    # max(blend.ratio, r_load) from the spec's cost model, with the measured read bandwidth of the tier
    # the query's passages come from (recomputing less than loading takes buys no speed).
    recompute_ratio: float | str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        r = self.recompute_ratio
        if isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0:
            self.blend = replace(self.blend, ratio=float(r))
        elif not (r is None or r == "auto"):
            raise ValueError(f"recompute_ratio must be None, a number in [0, 1] or 'auto', got {r!r}")
        if not 1 <= self.top_k <= 64:
            raise ValueError(f"top_k must be in [1, 64], got {self.top_k}")
        if not 0 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in [0, 4096], got {self.max_new_tokens}")
        if not isinstance(self.system, str) or not self.system.strip():
            raise ValueError(f"system must be a non-empty string, got {self.system!r}")


@dataclass
class IngestResult:
    passages: list[Passage]
    computed: int  # passages whose KV was computed now
    reused: int  # passages already in the store
    seconds: float


@dataclass
class Answer:
    text: str
    method: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    new_tokens: int
    passages: list[str]  # ids of the passages used, in prompt order
    reused_passages: int
    computed_passages: int
    prefix_tokens: int
    recompute_fraction: float | None  # CacheBlend: computed rows / a full prefill's, over all layers
    recompute_ratio: float | None = None  # CacheBlend: the r used (chosen by the cost model when "auto")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RagPipeline:
    """Documents in, answers out, for one engine, store and tenant. Thread-safe (one query at a time)."""

    def __init__(
        self,
        engine: Engine,
        store: TieredStore,
        model_id: str | None = None,
        config: RagConfig | None = None,
        tenant: str = "",
        folder: str | Path | None = None,
    ) -> None:
        self.engine, self.store = engine, store
        self.config = config or RagConfig()
        self.tokenizer = engine.tokenizer
        self.prefix = build_chat(self.tokenizer, "?", [], self.config.system).prefix
        # Passage KV depends on the prefix it was computed behind: the prefix is part of the namespace.
        digest = hashlib.blake2b(bytes(str(self.prefix), "ascii"), digest_size=8).hexdigest()
        layout = KVLayout.for_spec(engine.spec)
        model_id = model_id or engine.loaded.model_id
        self.connector = KVConnector(store, Namespace(model_id, layout, salt=f"{tenant}|rag:{digest}"))
        self.fuser = Fuser(engine, self.connector)
        self.catalog = Catalog(folder)
        self.retriever = BM25()
        self.retriever.add([p.id for p in self.catalog], [p.text for p in self.catalog])
        self.auto_ratio = AutoRatio(engine, store)
        self._lock = threading.Lock()

    # ---- ingest ----------------------------------------------------------------------------------

    def ingest(self, documents: Sequence[str | dict[str, Any]]) -> IngestResult:
        """Split, precompute and store; returns the passages (already stored ones are not recomputed)."""
        t0 = time.perf_counter()
        passages = [p for i, doc in enumerate(documents) for p in self._passages(i, doc)]
        bar = tqdm(passages, desc="ingest", unit="passage", disable=not self.config.progress)
        computed = 0
        with self._lock:
            prefix = self.fuser.prefix_cache(self.prefix, len(self.prefix))
            for p in bar:
                ids = encode(self.tokenizer, passage_text(p.text))
                computed += ensure_segments(self.engine, self.connector, prefix, [ids]).count(False)
        self.catalog.add(passages)
        self.retriever.add([p.id for p in passages], [p.text for p in passages])
        return IngestResult(passages, computed, len(passages) - computed, time.perf_counter() - t0)

    def _passages(self, i: int, doc: str | dict[str, Any]) -> list[Passage]:
        text, doc_id, title = _document(i, doc)
        out = []
        for piece in split_document(self.tokenizer, text, self.config.split):
            piece = f"{title}\n{piece}" if title else piece
            tokens = len(encode(self.tokenizer, passage_text(piece)))
            out.append(Passage(passage_id(piece), doc_id, piece, tokens))
        return out

    # ---- answer ----------------------------------------------------------------------------------

    def select(self, question: str, top_k: int | None = None) -> list[Passage]:
        """The top-k ingested passages for `question` (BM25), best first."""
        hits = self.retriever.search(question, top_k or self.config.top_k)
        return [self.catalog.get(pid) for pid, _ in hits]

    def prompt(self, question: str, passages: Sequence[str]) -> ChatPrompt:
        return build_chat(self.tokenizer, question, list(passages), self.config.system)

    def answer(
        self,
        question: str,
        passages: Sequence[str] | None = None,
        passage_ids: Sequence[str] | None = None,
        top_k: int | None = None,
        method: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Answer:
        """Answer from the given passage texts, or ingested passage ids, or else the top-k retrieved."""
        texts = self._texts(question, passages, passage_ids, top_k)
        prompt = self.prompt(question, texts)
        new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 0 <= new <= 4096:
            raise ValueError(f"max_new_tokens must be in [0, 4096], got {new}")
        check_length(self.engine, prompt, new)
        method = method or self.config.method
        t0 = time.perf_counter()
        with self._lock:
            blend = self.blend_config(prompt) if method == "cacheblend" else self.config.blend
            fused = self.fuser.fuse(prompt, method, blend, self.config.ape)
            tokens, _ = (
                self.engine.decode(fused.logits, fused.cache, new, fused.decode_attention)
                if new
                else ([], None)
            )
        answer = self._answer(fused, tokens, texts, time.perf_counter() - t0)
        if method == "cacheblend":
            answer.recompute_ratio = blend.ratios[0]
        return answer

    def blend_config(self, prompt: ChatPrompt) -> BlendConfig:
        """The CacheBlend config for a prompt: r from the cost model when `recompute_ratio` is "auto"."""
        config = self.config.blend
        if self.config.recompute_ratio != "auto":
            return config
        if len(config.ratios) > 1:
            raise ValueError(f"recompute_ratio 'auto' needs one check-layer ratio, got {config.ratio}")
        keys = [self.connector.namespace.segment_key(ids) for ids in prompt.passages]
        return replace(config, ratio=self.auto_ratio.ratio(keys, config.ratios[0]))

    def _texts(self, question, passages, passage_ids, top_k) -> list[str]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        if passages is not None and passage_ids is not None:
            raise ValueError("give passages or passage_ids, not both")
        if passages is not None:
            return [passage_text(p).strip() for p in passages]
        if passage_ids is not None:
            return [self.catalog.get(pid).text for pid in passage_ids]
        return [p.text for p in self.select(question, top_k)]

    def _answer(self, fused: Fused, tokens: list[int], texts: list[str], total: float) -> Answer:
        stop = self.engine.stop_ids()
        text = self.tokenizer.decode([t for t in tokens if t not in stop]).strip()
        stats = fused.stats
        return Answer(
            text=text,
            method=fused.method,
            ttft_s=fused.ttft_s,
            total_s=total,
            prompt_tokens=fused.prompt_tokens,
            new_tokens=len(tokens),
            passages=[passage_id(t) for t in texts],
            reused_passages=fused.reused_passages,
            computed_passages=fused.computed_passages,
            prefix_tokens=fused.prefix_tokens,
            recompute_fraction=stats.recompute_fraction() if stats is not None else None,
        )


def _document(i: int, doc: str | dict[str, Any]) -> tuple[str, str, str]:
    """(text, doc id, title) of a document given as a string or {"text", "id"?, "title"?}."""
    text: object  # checked below: a dict's "text" may be anything
    if isinstance(doc, str):
        text, doc_id, title = doc, f"doc-{i}", ""
    elif isinstance(doc, dict):
        unknown = set(doc) - {"text", "id", "title"}
        if unknown:
            raise ValueError(f"document {i} has unknown fields {sorted(unknown)}; allowed: text, id, title")
        text, doc_id, title = doc.get("text"), str(doc.get("id", f"doc-{i}")), str(doc.get("title") or "")
    else:
        raise TypeError(f"document {i} must be a str or a dict, got {type(doc).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"document {i} has no text")
    return text, doc_id, title.strip()
