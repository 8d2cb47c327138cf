"""Fitting the verifier on labelled question pairs, and the train/held-out split the benchmark shares.

The split is by a hash of `text_a` (the cached question), so no cached question appears on both
sides. The verifier is trained on 80% of the training side; when a target precision is given, its
cut is the lowest P(same) that reaches it on the other 20% (else 0.5). The held-out side is never seen (bench/semcache.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from engine.paths import data_dir, kvfuse_home
from semcache.embed import Embedder
from semcache.verify import DEFAULT_WEIGHTS, Verifier, feature_matrix


def default_pairs() -> Path:
    return data_dir() / "semcache" / "qqp_pairs_dev.json"


def load_pairs(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    path = Path(path) if path else default_pairs()
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all({"text_a", "text_b", "label"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{text_a, text_b, label}} objects")
    return rows[:limit] if limit else rows


def is_held_out(text_a: str) -> bool:
    return hashlib.blake2b(text_a.encode(), digest_size=4).digest()[0] % 2 == 1


def split_pairs(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held_out), about half each."""
    held = [is_held_out(p["text_a"]) for p in pairs]
    return [p for p, h in zip(pairs, held, strict=True) if not h], [
        p for p, h in zip(pairs, held, strict=True) if h
    ]


def embed_cached(
    embedder: Embedder, texts: list[str], cache_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Embeddings of `texts`, kept in $KVFUSE_HOME/semcache-embeddings (the full QQP set takes minutes)."""
    texts = sorted(set(texts))
    digest = hashlib.blake2b(("\n".join(texts) + embedder.model_id).encode(), digest_size=10).hexdigest()
    folder = cache_dir or kvfuse_home() / "semcache-embeddings"
    path = folder / f"{digest}.npy"
    if path.is_file():
        vecs = np.load(path, allow_pickle=False)
    else:
        vecs = embedder.embed(texts)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(path, vecs, allow_pickle=False)
    return dict(zip(texts, vecs, strict=True))


def pair_matrix(pairs: list[dict], vec_of: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Features of (query=text_b, cached=text_a) and labels."""
    q, c = [p["text_b"] for p in pairs], [p["text_a"] for p in pairs]
    X = feature_matrix(q, c, np.stack([vec_of[t] for t in q]), np.stack([vec_of[t] for t in c]))
    return X, np.array([int(p["label"]) for p in pairs])


def choose_cut(prob: np.ndarray, y: np.ndarray, target_precision: float) -> float:
    """The lowest cut whose precision on (prob, y) reaches the target (most recall at that precision)."""
    order = np.argsort(-prob)
    precision = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(precision >= target_precision)[0]
    if ok.size == 0:
        raise ValueError(f"no cut reaches precision {target_precision} on these pairs")
    return float(prob[order][ok.max()])


def fit_verifier(
    train: list[dict], vec_of: dict[str, np.ndarray], target_precision: float | None = None
) -> Verifier:
    """Cut 0.5 (same meaning more likely than not) unless a target precision asks for another."""
    fit_side = [p for p in train if hashlib.blake2b(p["text_a"].encode(), digest_size=4).digest()[1] % 5]
    calib = [p for p in train if not hashlib.blake2b(p["text_a"].encode(), digest_size=4).digest()[1] % 5]
    verifier = Verifier.fit(*pair_matrix(fit_side, vec_of))
    if target_precision is not None:
        Xc, yc = pair_matrix(calib, vec_of)
        verifier.cut = choose_cut(verifier.probability(Xc), yc, target_precision)
    return verifier


def fit_verifier_cli(
    pairs_path: str | None, out: str | None, limit: int | None, target_precision: float | None
) -> dict:
    t0 = time.perf_counter()
    train, held_out = split_pairs(load_pairs(pairs_path, limit))
    embedder = Embedder()
    vec_of = embed_cached(embedder, [t for p in train + held_out for t in (p["text_a"], p["text_b"])])
    verifier = fit_verifier(train, vec_of, target_precision)
    path = Path(out) if out else DEFAULT_WEIGHTS
    verifier.save(path)
    return {
        "weights": str(path),
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "cut": verifier.cut,
        "target_precision": target_precision,
        "seconds": time.perf_counter() - t0,
    }
