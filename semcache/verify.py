"""Verification after the threshold: is the cached question really the same question?

Cosine similarity alone confuses near-duplicates that differ in the one word that matters (a number,
a negation, "ascending" vs "descending"). A small cross-encoder (semcache/cross_encoder.py) reads
both questions together and gives a logit; a small network stacks that logit with the cosine and
lexical mismatch features into P(same meaning); a candidate below `cut` is refused. Weights are fitted
on QQP question pairs (`kvfuse semcache fit-verifier`) and stored as safetensors next to this file
(no pickle).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np

from semcache.cross_encoder import PREFIX as CROSS_PREFIX
from semcache.cross_encoder import PairEncoder

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
FEATURES = (*LEXICAL, "cross_logit")


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


_TOKEN = re.compile(r"\w+|[^\w\s]")  # any script's words, and every symbol on its own ("C++" is not "C")


def same_words(query: str, cached: str) -> bool:
    """The same words and symbols in the same order (case and spacing aside): the same question."""
    return _TOKEN.findall(query.casefold()) == _TOKEN.findall(cached.casefold())


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


def stack_features(queries: list[str], cached: list[str], cos: np.ndarray, logits: np.ndarray) -> np.ndarray:
    lex = np.stack([lexical_features(q, c, float(s)) for q, c, s in zip(queries, cached, cos, strict=True)])
    return np.concatenate([lex, np.asarray(logits, np.float32)[:, None]], axis=1)


@dataclass
class Verifier:
    """The cross-encoder, then a one-hidden-layer network over its logit and the lexical features."""

    encoder: PairEncoder
    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray  # [features, hidden]
    b1: np.ndarray
    w2: np.ndarray  # [hidden]
    b2: float
    cut: float = 0.5  # P(same meaning) a candidate needs; chosen on calibration pairs (semcache/fit.py)

    def __post_init__(self) -> None:
        n, h = self.w1.shape
        if (
            n != len(FEATURES)
            or self.mean.shape != (n,)
            or self.std.shape != (n,)
            or self.b1.shape != (h,)
            or self.w2.shape != (h,)
        ):
            raise ValueError(
                f"verifier shapes disagree: w1 {self.w1.shape} ({len(FEATURES)} features expected), "
                f"mean {self.mean.shape}, std {self.std.shape}, b1 {self.b1.shape}, w2 {self.w2.shape}"
            )
        if not 0.0 <= self.cut <= 1.0:
            raise ValueError(f"verifier cut must be in [0, 1], got {self.cut}")

    def probability(self, X: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(X).astype(np.float32) - self.mean) / self.std
        logits = np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2
        return 1.0 / (1.0 + np.exp(-logits))

    def features(self, queries: list[str], cached: list[str], U: np.ndarray, V: np.ndarray) -> np.ndarray:
        cos = np.einsum("ij,ij->i", np.atleast_2d(U), np.atleast_2d(V))
        return stack_features(queries, cached, cos, self.encoder.logits(cached, queries))

    def p_same_many(self, queries: list[str], cached: list[str], U: np.ndarray, V: np.ndarray) -> np.ndarray:
        p = self.probability(self.features(queries, cached, U, V))
        # hard rules: the networks see too few opposite-word pairs to learn it, and no identical pair
        # at all (QQP has none), so the cross-encoder's logit for one is arbitrary, sometimes negative
        opposite = np.array([opposite_words(q, c) for q, c in zip(queries, cached, strict=True)])
        same = np.array([same_words(q, c) for q, c in zip(queries, cached, strict=True)])
        return np.where(same, 1.0, np.where(opposite, 0.0, p))

    def p_same(self, query: str, cached: str, u: np.ndarray, v: np.ndarray) -> float:
        if same_words(query, cached):
            return 1.0  # skip the cross-encoder: the answer is known
        if opposite_words(query, cached):
            return 0.0
        return float(self.p_same_many([query], [cached], u[None], v[None])[0])

    @classmethod
    def fit_stacker(
        cls,
        encoder: PairEncoder,
        queries: list[str],
        cached: list[str],
        U: np.ndarray,
        V: np.ndarray,
        y: np.ndarray,
        hidden: int = 16,
        epochs: int = 60,
        seed: int = 0,
    ) -> Verifier:
        """Train the stacking network with torch (AdamW, dropout 0.2, batches of 128); seconds."""
        cos = np.einsum("ij,ij->i", U, V)
        X = stack_features(queries, cached, cos, encoder.logits(cached, queries))
        return cls.fit_stacker_on(encoder, X, y, hidden=hidden, epochs=epochs, seed=seed)

    @classmethod
    def fit_stacker_on(
        cls,
        encoder: PairEncoder,
        X: np.ndarray,
        y: np.ndarray,
        hidden: int = 16,
        epochs: int = 60,
        seed: int = 0,
    ) -> Verifier:
        """The stacker from ready features (`stack_features`): validation refits it per fold."""
        import torch

        y = np.asarray(y, np.float32)
        mean, std = X.mean(axis=0), X.std(axis=0) + 1e-6
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(hidden, 1),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
        Z, Y = torch.from_numpy((X - mean) / std), torch.from_numpy(y)
        for _ in range(epochs):
            for idx in torch.randperm(len(Z), generator=gen).split(128):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Z[idx]).squeeze(1), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        lin1, lin2 = cast(torch.nn.Linear, net[0]), cast(torch.nn.Linear, net[3])
        return cls(
            encoder,
            mean,
            std,
            lin1.weight.detach().numpy().T.copy(),
            lin1.bias.detach().numpy().copy(),
            lin2.weight.detach().numpy()[0].copy(),
            float(lin2.bias.item()),
        )

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> None:
        """Write the weights; `extra` metadata (e.g. the fit's validation record) is stored beside them."""
        from safetensors.numpy import save_file

        stack = {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2}
        stack["b2"] = np.array([self.b2], np.float32)
        tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in stack.items()}
        tensors.update({k: np.ascontiguousarray(v) for k, v in self.encoder.trained_tensors().items()})
        meta = {
            "cut": repr(self.cut),
            "features": json.dumps(list(FEATURES)),
            "frozen_layers": str(self.encoder.frozen_layers),
            **(extra or {}),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def shared(cls, path: str | Path = DEFAULT_WEIGHTS) -> Verifier:
        """A copy of the weights loaded once per process (caches and server replicas share the model);
        the copy's `cut` can be changed without touching the others'."""
        p = Path(path).resolve()
        return replace(_load_once(str(p), p.stat().st_mtime_ns if p.is_file() else 0))

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> Verifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                meta = f.metadata()
            if json.loads(meta["features"]) != list(FEATURES):
                raise ValueError(f"features {meta['features']} are not this code's {list(FEATURES)}")
            encoder = PairEncoder(int(meta["frozen_layers"]))
            encoder.load_trained({k: v for k, v in t.items() if k.startswith(CROSS_PREFIX)})
            return cls(
                encoder, t["mean"], t["std"], t["w1"], t["b1"], t["w2"], float(t["b2"][0]), float(meta["cut"])
            )
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"verifier weights {path} are unreadable: {exc}") from exc


def weights_metadata(path: str | Path = DEFAULT_WEIGHTS) -> dict[str, str]:
    """The metadata stored with the weights (cut, features, and the fit's validation record if any)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


@lru_cache(maxsize=4)
def _load_once(path: str, mtime_ns: int) -> Verifier:  # mtime in the key: refitted weights are reloaded
    return Verifier.load(path)
