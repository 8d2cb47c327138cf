"""Validation-only experiment for the verifier: a pair head on the frozen bi-encoder embeddings.

    OMP_NUM_THREADS=1 .venv/bin/python bench/semcache_pair_head.py

A small network over (|u - v|, u * v) of the two questions' all-MiniLM-L6-v2 embeddings is trained on the
verifier's fit part (the pairs the cross-encoder was fine-tuned on, cosine >= 0.70); its logit is added to
the shipped verifier's stacking features, and, as in semcache/fit.py, the stacker is refitted in 5 folds
by component over the calibration part (the validation set), scored out of fold: precision at recall
>= 0.40. Also: the cross-encoder's logit averaged over both question orders. No held-out pair is read.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from semcache.embed import Embedder  # noqa: E402
from semcache.fit import (  # noqa: E402
    MIN_RECALL,
    STACK_FLOOR,
    TRAIN_FLOOR,
    _byte,
    columns,
    component_keys,
    cosines,
    embed_cached,
    load_pairs,
    precision_at_recall,
    split_pairs,
    split_train,
)
from semcache.verify import Verifier, opposite_words, same_words, stack_features  # noqa: E402


def pair_features(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    return np.concatenate([np.abs(U - V), U * V], axis=1).astype(np.float32)


def _mlp(n_in: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1)
    )


def _train(net: torch.nn.Module, Z: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    X, Y = torch.from_numpy(Z.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(128):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(X[idx]).squeeze(1), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def pair_head(F: np.ndarray, y: np.ndarray, hidden: int, seed: int):
    torch.manual_seed(seed)
    net = _mlp(F.shape[1], hidden) if hidden else torch.nn.Linear(F.shape[1], 1)
    _train(net, F, y, epochs=30, lr=1e-3, seed=seed)
    return lambda G: net(torch.from_numpy(G)).squeeze(1).detach().numpy()


def stacker_oof(X: np.ndarray, y: np.ndarray, fold: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(same) of the stacking network (the shipped stacker's shape and training)."""
    oof = np.zeros(len(y))
    for f in np.unique(fold):
        part = fold == f
        mean, std = X[~part].mean(0), X[~part].std(0) + 1e-6
        torch.manual_seed(seed)
        net = _mlp(X.shape[1], 16)
        _train(net, (X[~part] - mean) / std, y[~part], epochs=60, lr=3e-3, seed=seed)
        with torch.no_grad():
            z = torch.from_numpy(((X[part] - mean) / std).astype(np.float32))
            oof[part] = torch.sigmoid(net(z).squeeze(1)).numpy()
    return oof


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pairs = load_pairs()
    train, _ = split_pairs(pairs)  # the held-out half is dropped here, unread
    fit_side, calib = split_train(train)
    vec_of = embed_cached(Embedder(), [t for p in pairs for t in (p["text_a"], p["text_b"])])
    fit_side = [p for p, c in zip(fit_side, cosines(fit_side, vec_of), strict=True) if c >= TRAIN_FLOOR]
    _, _, Uf, Vf, yf = columns(fit_side, vec_of)
    cos_all = cosines(calib, vec_of)
    positives = int(sum(int(p["label"]) for p in calib))
    above = np.nonzero(cos_all >= STACK_FLOOR)[0]
    q, c, Uc, Vc, y = columns([calib[i] for i in above], vec_of)
    keys = component_keys(calib)
    fold = np.array([_byte(keys[i], 2) % 5 for i in above])
    verifier = Verifier.load()
    X = stack_features(q, c, cos_all[above], verifier.encoder.logits(c, q))
    both = X.copy()
    both[:, -1] = 0.5 * (X[:, -1] + verifier.encoder.logits(q, c))
    opposite = np.array([opposite_words(a, b) for a, b in zip(q, c, strict=True)], dtype=bool)
    same = np.array([same_words(a, b) for a, b in zip(q, c, strict=True)], dtype=bool)

    def score(p: np.ndarray) -> dict | None:  # the verifier's hard rules, as in semcache/fit.py validate
        p = p.copy()
        p[opposite], p[same] = 0.0, 1.0
        return precision_at_recall(p, y, positives, MIN_RECALL)

    out: dict = {"fit_pairs": len(fit_side), "validation_pairs": len(y), "validation_positives": positives}
    out["shipped_stack"] = score(stacker_oof(X, y, fold))
    out["cross_logit_both_orders"] = score(stacker_oof(both, y, fold))
    heads = {}
    for hidden, seed in ((0, 0), (64, 0), (64, 1), (256, 0), (256, 1)):
        h = pair_head(pair_features(Uf, Vf), yf, hidden, seed)(pair_features(Uc, Vc))
        heads[(hidden, seed)] = h
        out[f"pair_head_{hidden or 'linear'}_seed{seed}_alone"] = precision_at_recall(
            h, y, positives, MIN_RECALL
        )
    out["stack+linear_head"] = score(stacker_oof(np.c_[X, heads[(0, 0)]], y, fold))
    out["stack+mlp64_head"] = score(stacker_oof(np.c_[X, heads[(64, 0)]], y, fold))
    avg = np.mean([h for (hidden, _), h in heads.items() if hidden], axis=0)
    out["stack+mlp_heads_avg"] = score(stacker_oof(np.c_[X, avg], y, fold))
    for seed in (0, 1, 2):
        out[f"both_orders+mlp_heads_avg_stacker_seed{seed}"] = score(
            stacker_oof(np.c_[both, avg], y, fold, seed)
        )
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps({"bench": "semcache_pair_head", **out}))


if __name__ == "__main__":
    main()
