"""Verification after the threshold: is the cached question really the same question?

Cosine similarity alone confuses near-duplicates that differ in the one word that matters (a number,
a negation, "ascending" vs "descending"). A small network over the cosine, lexical mismatch
features and the element-wise product and difference of the two embeddings (the classic sentence-pair
head) gives P(same meaning); a candidate below `cut` is refused. Weights are fitted on QQP question
pairs (`kvfuse semcache fit-verifier`) and stored as safetensors next to this file (no pickle).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WEIGHTS = Path(__file__).with_name("verifier.safetensors")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "none", "nor", "nothing", "neither"})


def _wordlist(text: str) -> list[str]:
    return text.split()


STOPWORDS = frozenset(
    _wordlist(
        "a an the of to in on for and or is are was were be been do does did i you my your me we it its "
        "this that these those with at by from as can could should would will how what why when where who "
        "which there their they he she his her"
    )
)
# Words whose swap flips the question ("sort ascending" vs "sort descending"). On QQP this rule fires
# on 85 of 40,427 pairs, 80% of them labelled different, and costs 0.1% of the true duplicates.
OPPOSITES = tuple(
    pair.split("/")
    for pair in _wordlist(
        "ascending/descending increase/decrease before/after maximum/minimum max/min buy/sell best/worst "
        "positive/negative more/less higher/lower largest/smallest biggest/smallest first/last import/export "
        "male/female men/women upload/download input/output win/lose start/stop add/remove encrypt/decrypt "
        "north/south east/west cheap/expensive hot/cold true/false open/close rise/fall gain/lose easy/hard "
        "fast/slow good/bad rich/poor love/hate legal/illegal possible/impossible safe/unsafe "
        "advantages/disadvantages"
    )
)
LEXICAL = (
    "cosine",
    "jaccard",
    "content_jaccard",
    "content_unshared",
    "number_mismatch",
    "negation_mismatch",
    "first_word_mismatch",
    "length_log_ratio",
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _negated(words: list[str]) -> bool:
    return any(w in NEGATIONS or w.endswith("n't") for w in words)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def opposite_words(query: str, cached: str) -> bool:
    """One side has a word and the other its opposite, and neither has both."""
    a, b = set(_words(query)), set(_words(cached))
    return any(
        (x in a and y in b and y not in a and x not in b) or (y in a and x in b and x not in a and y not in b)
        for x, y in OPPOSITES
    )


def lexical_features(query: str, cached: str, cosine: float) -> np.ndarray:
    wq, wc = _words(query), _words(cached)
    sq, sc = set(wq), set(wc)
    cq, cc = sq - STOPWORDS, sc - STOPWORDS
    nq, nc = set(_NUMBER.findall(query)), set(_NUMBER.findall(cached))
    return np.array(
        [
            cosine,
            _jaccard(sq, sc),
            _jaccard(cq, cc),
            len(cq ^ cc) / max(len(cq | cc), 1),
            float(nq != nc),
            float(_negated(wq) != _negated(wc)),
            float(bool(wq) and bool(wc) and wq[0] != wc[0]),
            abs(np.log((len(wq) + 1) / (len(wc) + 1))),
        ],
        dtype=np.float32,
    )


def pair_features(query: str, cached: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cosine = float(np.dot(u, v))
    return np.concatenate([lexical_features(query, cached, cosine), u * v, np.abs(u - v)])


def feature_matrix(queries: list[str], cached: list[str], U: np.ndarray, V: np.ndarray) -> np.ndarray:
    return np.stack([pair_features(q, c, u, v) for q, c, u, v in zip(queries, cached, U, V, strict=True)])


@dataclass
class Verifier:
    """A one-hidden-layer network over standardized pair features (inference in numpy)."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray  # [features, hidden]
    b1: np.ndarray
    w2: np.ndarray  # [hidden]
    b2: float
    cut: float = 0.5  # P(same meaning) a candidate needs; chosen on training pairs (see semcache/fit.py)

    def __post_init__(self) -> None:
        n, h = self.w1.shape
        if (
            self.mean.shape != (n,)
            or self.std.shape != (n,)
            or self.b1.shape != (h,)
            or self.w2.shape != (h,)
        ):
            raise ValueError(
                f"verifier shapes disagree: w1 {self.w1.shape}, mean {self.mean.shape}, "
                f"std {self.std.shape}, b1 {self.b1.shape}, w2 {self.w2.shape}"
            )
        if not 0.0 <= self.cut <= 1.0:
            raise ValueError(f"verifier cut must be in [0, 1], got {self.cut}")

    def probability(self, X: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(X).astype(np.float32) - self.mean) / self.std
        logits = np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2
        return 1.0 / (1.0 + np.exp(-logits))

    def p_same(self, query: str, cached: str, u: np.ndarray, v: np.ndarray) -> float:
        if opposite_words(query, cached):
            return 0.0  # a hard rule: the network sees too few such pairs to learn it
        return float(self.probability(pair_features(query, cached, u, v))[0])

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, hidden: int = 64, epochs: int = 10, seed: int = 0) -> Verifier:
        """Train with torch (AdamW, dropout 0.2, batches of 256); ~40 s for 20k pairs on 2 cores."""
        import torch

        X, y = np.asarray(X, np.float32), np.asarray(y, np.float32)
        mean, std = X.mean(axis=0), X.std(axis=0) + 1e-6
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, 1),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
        Z, Y = torch.from_numpy((X - mean) / std), torch.from_numpy(y)
        for _ in range(epochs):
            for idx in torch.randperm(len(Z), generator=gen).split(256):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Z[idx]).squeeze(1), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        lin1, lin2 = net[0], net[3]
        return cls(
            mean,
            std,
            lin1.weight.detach().numpy().T.copy(),
            lin1.bias.detach().numpy().copy(),
            lin2.weight.detach().numpy()[0].copy(),
            float(lin2.bias.item()),
        )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {
            "mean": self.mean,
            "std": self.std,
            "w1": self.w1,
            "b1": self.b1,
            "w2": self.w2,
            "b2": np.array([self.b2], np.float32),
        }
        meta = {"cut": repr(self.cut), "features": json.dumps(list(LEXICAL) + ["u*v", "|u-v|"])}
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=meta
        )

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> Verifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                cut = float(f.metadata()["cut"])
            return cls(t["mean"], t["std"], t["w1"], t["b1"], t["w2"], float(t["b2"][0]), cut)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"verifier weights {path} are unreadable: {exc}") from exc
