"""Category of a question: nearest centroid of labelled example questions, in embedding space.

Cheap (one matrix-vector product on the query embedding we already have) and trained from a few
examples per category. Below `min_score` the question goes to the default category.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Prediction:
    category: str
    score: float  # cosine similarity to the category's centroid


class CentroidClassifier:
    def __init__(self, names: list[str], centroids: np.ndarray) -> None:
        if centroids.ndim != 2 or len(names) != centroids.shape[0]:
            raise ValueError(f"need one centroid row per name: {len(names)} names, {centroids.shape}")
        self.names = list(names)
        self.centroids = centroids.astype(np.float32)

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: list[str]) -> CentroidClassifier:
        if len(labels) != len(vectors) or not labels:
            raise ValueError(f"need one label per vector, got {len(labels)} labels, {len(vectors)} vectors")
        names = sorted(set(labels))
        lab = np.asarray(labels)
        rows = [vectors[lab == n].mean(axis=0) for n in names]
        cent = np.stack(rows)
        cent /= np.linalg.norm(cent, axis=1, keepdims=True).clip(min=1e-12)
        return cls(names, cent)

    def predict(self, vectors: np.ndarray) -> list[Prediction]:
        scores = np.atleast_2d(vectors) @ self.centroids.T
        best = scores.argmax(axis=1)
        return [Prediction(self.names[b], float(scores[i, b])) for i, b in enumerate(best)]


def cross_validate(vectors: np.ndarray, labels: list[str], folds: int = 5, seed: int = 0) -> float:
    """Accuracy of nearest-centroid by k-fold cross-validation (stratification not needed at ~10/class)."""
    if folds < 2 or folds > len(labels):
        raise ValueError(f"folds must be in [2, {len(labels)}], got {folds}")
    order = np.random.default_rng(seed).permutation(len(labels))
    lab = np.asarray(labels)
    correct = 0
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        clf = CentroidClassifier.fit(vectors[train], list(lab[train]))
        pred = [p.category for p in clf.predict(vectors[test])]
        correct += int((np.asarray(pred) == lab[test]).sum())
    return correct / len(labels)


def load_examples(path: str | Path) -> tuple[list[str], list[str]]:
    """`[{"category": ..., "question": ...}, ...]` -> (questions, categories)."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of {{category, question}} objects")
    try:
        return [str(r["question"]) for r in rows], [str(r["category"]) for r in rows]
    except KeyError as exc:
        raise ValueError(f"{path}: every example needs 'category' and 'question', missing {exc}") from exc
