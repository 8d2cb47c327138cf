"""Verification after the threshold: is the cached question really the same question?

Cosine similarity alone confuses near-duplicates that differ in the one word that matters (a number,
a negation, "ascending" vs "descending", a rare word on one side). Small networks over the cosine and
the pair's word features (semcache/pair_features.py: overlap weighted by IDF, order, numbers,
negation) give P(same meaning); a candidate below `cut` is refused. Nothing runs a model: the
cosine comes from the two stored embeddings, so a verification costs about 0.5 ms (Python word features).
Weights (a few networks averaged, and the IDF table) are fitted on QQP question pairs
(`kvfuse semcache fit-verifier`, semcache/fit.py) and stored as safetensors next to this file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semcache.mlp import Mlp
from semcache.pair_features import FEATURES, IdfTable, features_many, wordlist, words

if TYPE_CHECKING:
    from semcache.pair_model import PairModel

DEFAULT_WEIGHTS = Path(__file__).with_name("verifier.safetensors")
# Words whose swap flips the question ("sort ascending" vs "sort descending"). On QQP this rule fires
# on 85 of 40,427 pairs, 80% of them labelled different, and costs 0.1% of the true duplicates.
OPPOSITES = tuple(
    tuple(pair.split("/"))
    for pair in wordlist(
        "ascending/descending increase/decrease before/after maximum/minimum max/min buy/sell best/worst "
        "positive/negative more/less higher/lower largest/smallest biggest/smallest first/last import/export "
        "male/female men/women upload/download input/output win/lose start/stop add/remove encrypt/decrypt "
        "north/south east/west cheap/expensive hot/cold true/false open/close rise/fall gain/lose easy/hard "
        "fast/slow good/bad rich/poor love/hate legal/illegal possible/impossible safe/unsafe "
        "advantages/disadvantages"
    )
)


def opposite_words(query: str, cached: str) -> bool:
    """One side has a word and the other its opposite, and neither has both."""
    a, b = set(words(query)), set(words(cached))
    return any(
        (x in a and y in b and y not in a and x not in b) or (y in a and x in b and x not in a and y not in b)
        for x, y in OPPOSITES
    )


_TOKEN = re.compile(r"\w+|[^\w\s]")  # any script's words, and every symbol on its own ("C++" is not "C")


def same_words(query: str, cached: str) -> bool:
    """The same words and symbols in the same order (case and spacing aside): the same question."""
    return _TOKEN.findall(query.casefold()) == _TOKEN.findall(cached.casefold())


def apply_rules(p: np.ndarray, queries: list[str], cached: list[str]) -> np.ndarray:
    """The hard rules over network outputs: the networks see too few opposite-word pairs to learn
    them, and no identical pair at all (QQP has none), so their output for one is arbitrary."""
    opposite = np.array([opposite_words(q, c) for q, c in zip(queries, cached, strict=True)], dtype=bool)
    same = np.array([same_words(q, c) for q, c in zip(queries, cached, strict=True)], dtype=bool)
    return np.where(same, 1.0, np.where(opposite, 0.0, p))


@dataclass
class Verifier:
    """The average logit of `nets` over the pair features (and the pair model's logit), as P(same)."""

    nets: list[Mlp]
    idf: IdfTable
    cut: float = 0.5  # P(same meaning) a candidate needs; chosen on validation (semcache/fit.py)
    metadata: dict[str, str] = field(default_factory=dict)  # the fit's record, as stored
    # Optional: a cross-encoder reading both questions (semcache/pair_model.py); its logit is the
    # networks' last input. 52-58 ms p50 per verified lookup at load 7-9 (word features: ~0.6 ms).
    pair: PairModel | None = None

    def __post_init__(self) -> None:
        if not self.nets:
            raise ValueError("a verifier needs at least one network")
        n = len(FEATURES) + (self.pair is not None)
        for net in self.nets:
            if net.n_features != n:
                raise ValueError(f"a network takes {net.n_features} features, this verifier gives {n}")
        if not 0.0 <= self.cut <= 1.0:
            raise ValueError(f"verifier cut must be in [0, 1], got {self.cut}")

    @staticmethod
    def probability_of(nets: list[Mlp], X: np.ndarray) -> np.ndarray:
        logit = np.mean([net.logits(X) for net in nets], axis=0)
        return 1.0 / (1.0 + np.exp(-logit))

    def probability(self, X: np.ndarray) -> np.ndarray:
        return self.probability_of(self.nets, X)

    def features(self, queries: list[str], cached: list[str], U: np.ndarray, V: np.ndarray) -> np.ndarray:
        cos = np.einsum("ij,ij->i", np.atleast_2d(U), np.atleast_2d(V))
        X = features_many(queries, cached, cos, self.idf)
        if self.pair is None:
            return X
        return np.concatenate([X, self.pair.logits(cached, queries)[:, None]], axis=1)

    def p_same_many(self, queries: list[str], cached: list[str], U: np.ndarray, V: np.ndarray) -> np.ndarray:
        """P(same meaning) of each (query, cached question) pair, from their texts and unit embeddings."""
        if not queries:
            return np.zeros(0)
        return apply_rules(self.probability(self.features(queries, cached, U, V)), queries, cached)

    def p_same(self, query: str, cached: str, u: np.ndarray, v: np.ndarray) -> float:
        return float(self.p_same_many([query], [cached], u[None], v[None])[0])

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> None:
        """Write the weights; `extra` metadata (e.g. the fit's validation record) is stored beside them."""
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        for i, net in enumerate(self.nets):
            tensors.update(net.tensors(f"net{i}."))
        if self.pair is not None:
            tensors.update(self.pair.trained_tensors())
        meta = {
            "cut": repr(self.cut),
            "features": json.dumps(list(FEATURES)),
            "nets": str(len(self.nets)),
            "idf": json.dumps(self.idf.idf, sort_keys=True, separators=(",", ":")),
            "idf_unseen": repr(self.idf.unseen),
            **(extra or {}),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def shared(cls, path: str | Path = DEFAULT_WEIGHTS) -> Verifier:
        """A copy of the weights loaded once per process (caches and server replicas share them);
        the copy's `cut` can be changed without touching the others'."""
        p = Path(path).resolve()
        return replace(_load_once(str(p), p.stat().st_mtime_ns if p.is_file() else 0))

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> Verifier:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                meta = dict(f.metadata() or {})
            if json.loads(meta["features"]) != list(FEATURES):
                raise ValueError(f"features {meta['features']} are not this code's {list(FEATURES)}")
            nets = [Mlp.from_tensors(t, f"net{i}.") for i in range(int(meta["nets"]))]
            idf = IdfTable(
                {str(k): float(v) for k, v in json.loads(meta["idf"]).items()}, float(meta["idf_unseen"])
            )
            return cls(nets, idf, float(meta["cut"]), meta, _pair_of(t))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise ValueError(f"verifier weights {path} are unreadable: {exc}") from exc


def _pair_of(tensors: dict[str, np.ndarray]) -> PairModel | None:
    """The pair model stored with the networks, if any (torch and transformers load only then)."""
    from semcache.pair_model import PREFIX, PairModel

    mine = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if not mine:
        return None
    model = PairModel()
    model.load_trained(mine)
    return model


def weights_metadata(path: str | Path = DEFAULT_WEIGHTS) -> dict[str, str]:
    """The metadata stored with the weights (cut, features, and the fit's validation record if any)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


@lru_cache(maxsize=4)
def _load_once(path: str, mtime_ns: int) -> Verifier:  # mtime in the key: refitted weights are reloaded
    return Verifier.load(path)
