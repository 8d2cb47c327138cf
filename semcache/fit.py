"""Fitting the verifier on labelled question pairs, and the train/held-out split the benchmark shares.

QQP questions repeat across pairs, so a split by pair (or by one side's text) lets a held-out question
be seen in training. Here the pairs are grouped into connected components of the graph whose nodes are
question texts and whose edges are pairs; a component goes whole to one side, by a hash of its
smallest question. No question text therefore appears on both sides. The split is computed over the
whole file, so a subset (the benchmark's --quick) is still disjoint from what the shipped weights saw.

The held-out half is never used to choose anything. On the training half, components go to 5 folds
(another byte of the same hash); each fold is predicted by networks fitted on the other four (and an
IDF table counted on their questions only), so the out-of-fold P(same) of every training pair gives
the validation: precision at recall >= 0.40 (recall over every label-1 pair, also those below the
cosine floor, as on the held-out side), its spread over the folds, and the operating cut. The shipped
networks are then fitted on the whole training half.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from engine.paths import data_dir, kvfuse_home
from semcache.embed import Embedder

TRAIN_FLOOR = 0.70  # the networks learn from a little below the lowest category threshold (0.80)
VERIFY_FLOOR = 0.80  # validation and the cut only on pairs the cache would verify
MIN_RECALL = 0.40  # the target is precision at recall >= 0.40
# The operating cut is chosen for a little more recall than the target on validation, so that the
# held-out recall (a sample of its own) stays at or above the target.
RECALL_MARGIN = 0.02
VALIDATION_FOLDS = 5


def default_pairs() -> Path:
    return data_dir() / "semcache" / "qqp_pairs_dev.json"


def load_pairs(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    path = Path(path) if path else default_pairs()
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all({"text_a", "text_b", "label"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{text_a, text_b, label}} objects")
    return rows[:limit] if limit else rows


def component_keys(pairs: list[dict]) -> list[str]:
    """Per pair, the smallest question text of its connected component (union-find over texts)."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = root(p["text_a"]), root(p["text_b"])
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller text stays root: the key is order-free
    return [root(p["text_a"]) for p in pairs]


def _byte(key: str, i: int) -> int:
    return hashlib.blake2b(key.encode(), digest_size=4).digest()[i]


def split_pairs(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held_out), about half each, disjoint by question text."""
    held = [_byte(k, 0) % 2 == 1 for k in component_keys(pairs)]
    return [p for p, h in zip(pairs, held, strict=True) if not h], [
        p for p, h in zip(pairs, held, strict=True) if h
    ]


def split_train(train: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fit, calibration), about 80/20 of the training side, disjoint by question text."""
    calib = [_byte(k, 1) % 5 == 0 for k in component_keys(train)]
    return [p for p, c in zip(train, calib, strict=True) if not c], [
        p for p, c in zip(train, calib, strict=True) if c
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


def cosines(pairs: list[dict], vec_of: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([float(np.dot(vec_of[p["text_a"]], vec_of[p["text_b"]])) for p in pairs], np.float32)


def columns(pairs: list[dict], vec_of: dict[str, np.ndarray]):
    """(queries = text_b, cached = text_a, their vectors, labels)."""
    q, c = [p["text_b"] for p in pairs], [p["text_a"] for p in pairs]
    U, V = np.stack([vec_of[t] for t in q]), np.stack([vec_of[t] for t in c])
    return q, c, U, V, np.array([int(p["label"]) for p in pairs])


def choose_cut(prob: np.ndarray, y: np.ndarray, target_precision: float) -> float:
    """The lowest cut whose precision on (prob, y) reaches the target (most recall at that precision)."""
    order = np.argsort(-prob)
    precision = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(precision >= target_precision)[0]
    if ok.size == 0:
        raise ValueError(f"no cut reaches precision {target_precision} on these pairs")
    return float(prob[order][ok.max()])


def _cuts(prob: np.ndarray, y: np.ndarray, positives: int):
    """(cut, precision, recall) at every distinct cut, most confident first; recall over `positives`."""
    order = np.argsort(-prob, kind="stable")
    ps, tp = prob[order], np.cumsum(y[order])
    last = np.r_[ps[1:] != ps[:-1], True]  # a cut takes a tie group whole
    k = np.nonzero(last)[0]
    return ps[k], tp[k] / (k + 1), tp[k] / max(positives, 1)


def precision_at_recall(prob: np.ndarray, y: np.ndarray, positives: int, min_recall: float) -> dict | None:
    """The best precision over cuts whose recall reaches `min_recall`, with that cut."""
    cut, precision, recall = _cuts(prob, y, positives)
    ok = np.nonzero(recall >= min_recall)[0]
    if ok.size == 0:
        return None
    i = ok[np.argmax(precision[ok])]
    return {"precision": float(precision[i]), "recall": float(recall[i]), "cut": float(cut[i])}


def cut_for_recall(prob: np.ndarray, y: np.ndarray, positives: int, recall_target: float) -> float:
    """The highest cut whose recall reaches the target (the most precise such cut, on these pairs)."""
    cut, _, recall = _cuts(prob, y, positives)
    ok = np.nonzero(recall >= recall_target)[0]
    if ok.size == 0:
        raise ValueError(f"no cut reaches recall {recall_target} on these pairs")
    return float(cut[ok.min()])


def fold_of(pairs: list[dict], folds: int = VALIDATION_FOLDS) -> np.ndarray:
    """Validation fold of each pair, whole components per fold (byte 3: independent of the splits)."""
    return np.array([_byte(k, 3) % folds for k in component_keys(pairs)])


def _fit_nets(X: np.ndarray, y: np.ndarray, params, seeds: tuple[int, ...]) -> list:
    from semcache.mlp import fit_mlp

    return [fit_mlp(X, y, params, seed) for seed in seeds]


def _features(
    pairs: list[dict], vec_of: dict[str, np.ndarray], rows: np.ndarray, idf, extra: np.ndarray | None = None
) -> np.ndarray:
    """The word features of `pairs[rows]`, and `extra[rows]` (the pair model's logit) as a last column."""
    from semcache.pair_features import features_many

    q, c, U, V, _ = columns([pairs[i] for i in rows], vec_of)
    X = features_many(q, c, np.einsum("ij,ij->i", U, V), idf)
    return X if extra is None else np.concatenate([X, extra[rows, None].astype(np.float32)], axis=1)


def _texts(pairs: list[dict], rows: np.ndarray) -> list[str]:
    return [t for i in rows for t in (pairs[i]["text_a"], pairs[i]["text_b"])]


def validate(
    train: list[dict],
    vec_of: dict[str, np.ndarray],
    params=None,
    seeds: tuple[int, ...] = (0, 1, 2),
    train_floor: float = TRAIN_FLOOR,
    folds: int = VALIDATION_FOLDS,
    log=print,
    extra: np.ndarray | None = None,
) -> dict:
    """Out-of-fold P(same) on the training pairs above VERIFY_FLOOR; precision at MIN_RECALL pooled
    and per fold. No prediction comes from networks (or an IDF table) that saw the pair's component.
    `extra`: one more input per training pair (an out-of-fold pair-model logit, semcache/fit_pair.py)."""
    from semcache.pair_features import IdfTable
    from semcache.verify import Verifier, apply_rules

    cos = cosines(train, vec_of)
    y = np.array([int(p["label"]) for p in train])
    fold = fold_of(train, folds)
    oof = np.full(len(train), np.nan)
    per_fold = []
    for f in range(folds):
        t0 = time.perf_counter()
        fit_rows = np.nonzero((fold != f) & (cos >= train_floor))[0]
        test_rows = np.nonzero((fold == f) & (cos >= VERIFY_FLOOR))[0]
        idf = IdfTable.from_texts(_texts(train, np.nonzero(fold != f)[0]))
        nets = _fit_nets(_features(train, vec_of, fit_rows, idf, extra), y[fit_rows], params, seeds)
        q, c = [train[i]["text_b"] for i in test_rows], [train[i]["text_a"] for i in test_rows]
        p = Verifier.probability_of(nets, _features(train, vec_of, test_rows, idf, extra))
        oof[test_rows] = apply_rules(p, q, c)
        best = precision_at_recall(oof[test_rows], y[test_rows], int(y[fold == f].sum()), MIN_RECALL)
        per_fold.append(best["precision"] if best else None)
        log(f"fold {f + 1}/{folds}: {len(fit_rows)} pairs fitted, {best}, {time.perf_counter() - t0:.0f} s")
    above = np.nonzero(cos >= VERIFY_FLOOR)[0]
    positives = int(y.sum())
    ok = [p for p in per_fold if p is not None]
    return {
        "oof": oof[above],
        "y": y[above],
        "positives": positives,
        "pairs": len(above),
        "verifier": precision_at_recall(oof[above], y[above], positives, MIN_RECALL),
        "cosine": precision_at_recall(cos[above], y[above], positives, MIN_RECALL),
        "per_fold_precision": per_fold,
        "per_fold_mean_std": [float(np.mean(ok)), float(np.std(ok))] if ok else None,
    }


def fit_verifier(
    train: list[dict],
    vec_of: dict[str, np.ndarray],
    target_precision: float | None = None,
    params=None,
    seeds: tuple[int, ...] = (0, 1, 2),
    train_floor: float = TRAIN_FLOOR,
    log=print,
):
    """Validation by folds on the training pairs, then the networks fitted on all of them.

    Returns (verifier, record); the record (validation, the operating cut for recall MIN_RECALL +
    RECALL_MARGIN on the out-of-fold predictions) goes into the weights' metadata.
    """
    from dataclasses import asdict

    from semcache.mlp import MlpParams
    from semcache.pair_features import IdfTable
    from semcache.verify import Verifier

    if not 0.0 <= train_floor <= VERIFY_FLOOR:
        raise ValueError(f"train_floor must be in [0, {VERIFY_FLOOR}], got {train_floor}")
    params = params or MlpParams()
    val = validate(train, vec_of, params, seeds, train_floor, log=log)
    cos = cosines(train, vec_of)
    rows = np.nonzero(cos >= train_floor)[0]
    y = np.array([int(p["label"]) for p in train])
    idf = IdfTable.from_texts(_texts(train, np.arange(len(train))))
    verifier = Verifier(_fit_nets(_features(train, vec_of, rows, idf), y[rows], params, seeds), idf)
    if target_precision is not None:
        verifier.cut = choose_cut(val["oof"], val["y"], target_precision)
    operating = round(MIN_RECALL + RECALL_MARGIN, 4)
    record = {
        "train_pairs": len(train),
        "fit_pairs": len(rows),
        "train_floor": train_floor,
        "seeds": list(seeds),
        "params": asdict(params),
        "idf_words": len(idf.idf),
        "validation_pairs": val["pairs"],
        "validation_positives": val["positives"],
        "validation": {k: val[k] for k in ("verifier", "cosine", "per_fold_precision", "per_fold_mean_std")},
        "operating_recall": operating,
        "operating_cut": cut_for_recall(val["oof"], val["y"], val["positives"], operating),
    }
    return verifier, record


def fit_verifier_cli(
    pairs_path: str | None,
    out: str | None,
    limit: int | None,
    target_precision: float | None,
    train_floor: float = TRAIN_FLOOR,
    seeds: int = 3,
) -> dict:
    import torch

    from semcache.verify import DEFAULT_WEIGHTS

    torch.set_num_threads(1)  # shared cores: more threads were slower, not faster
    t0 = time.perf_counter()
    pairs = load_pairs(pairs_path)
    train, held_out = split_pairs(pairs)  # over the whole file, so --limit keeps the same split
    train = train[:limit] if limit else train
    vec_of = embed_cached(Embedder(), [t for p in pairs for t in (p["text_a"], p["text_b"])])
    verifier, record = fit_verifier(
        train, vec_of, target_precision, seeds=tuple(range(seeds)), train_floor=train_floor
    )
    path = Path(out) if out else DEFAULT_WEIGHTS
    verifier.save(path, {"validation": json.dumps(record)})
    return {
        "weights": str(path),
        "bytes": path.stat().st_size,
        "held_out_pairs": len(held_out),
        **record,
        "cut": verifier.cut,
        "target_precision": target_precision,
        "seconds": time.perf_counter() - t0,
    }
