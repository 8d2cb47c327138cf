"""One in-memory vector index per scope: exact (a matrix) while small, hnswlib once large.

A scope starts as a flat matrix of `initial_capacity` rows, doubled when full, searched exactly with
one matrix-vector product. An hnswlib graph costs ~2.5 MiB before its first vector (hnswlib 0.8 gives
every index 65,536 label locks, whatever its capacity: measured 2.5 MiB RSS per index at capacity 1
as at 1,024), so a scope only becomes one when it reaches `hnsw_min_entries`; below that the exact
search is also no slower. A graph grows by resizing (doubling), deletes by marking, is rebuilt when too
holey, and goes back to a matrix when it shrinks below half of `hnsw_min_entries`.

Entry ids are strings; rows and hnswlib labels are integers, so each index keeps the mapping. An index
folder holds `meta.json` (labels and parameters) and either `index.bin` (hnswlib's own format) or
`vectors.npy` (the matrix); no pickle.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np

HNSW_FIXED_BYTES = 2_560 * 1024  # measured RSS of an empty hnswlib 0.8 index (its label locks)


@dataclass
class IndexParams:
    M: int = 16
    ef_construction: int = 200
    ef: int = 64  # measured here: recall@1 0.988 at 100k real question embeddings
    initial_capacity: int = 4  # rows of a new scope's matrix; doubled when full
    hnsw_min_entries: int = 2048  # a scope this large becomes an HNSW graph; smaller ones stay exact
    rebuild_deleted_fraction: float = 0.25  # rebuild once this share of the graph is tombstones

    def __post_init__(self) -> None:
        if (
            self.M < 2
            or self.ef_construction < 1
            or self.ef < 1
            or self.initial_capacity < 1
            or self.hnsw_min_entries < 2
        ):
            raise ValueError(f"index parameters must be positive (M >= 2, hnsw_min_entries >= 2), got {self}")
        if not 0.0 < self.rebuild_deleted_fraction <= 1.0:
            raise ValueError(
                f"rebuild_deleted_fraction must be in (0, 1], got {self.rebuild_deleted_fraction}"
            )


class VectorIndex:
    """Inner product over unit vectors, so similarity = cosine (exact, or 1 - HNSW distance)."""

    def __init__(self, dim: int, params: IndexParams | None = None) -> None:
        self.dim = dim
        self.params = params or IndexParams()
        self._lock = threading.Lock()
        self._flat: np.ndarray | None = None
        self._hnsw: hnswlib.Index | None = None
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._next = 0  # rows used (flat) or labels handed out (hnsw)
        self._deleted = 0  # tombstones in the graph (always 0 when flat)
        self._to_flat(np.zeros((0, dim), np.float32), [])

    @property
    def kind(self) -> str:
        return "hnsw" if self._hnsw is not None else "flat"

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._label_of

    def ids(self) -> list[str]:
        return list(self._label_of)

    def nbytes(self) -> int:
        """Estimated memory of the vectors and graph (not of the id mappings)."""
        with self._lock:
            if self._hnsw is None:
                assert self._flat is not None
                return self._flat.nbytes
            per_element = 4 * self.dim + 4 * (2 * self.params.M + 1) + 8 + 48  # vector, links, label, locks
            return HNSW_FIXED_BYTES + per_element * self._hnsw.get_max_elements()

    def add(self, entry_id: str, vector: np.ndarray) -> None:
        vec = self._check(vector)
        with self._lock:
            if entry_id in self._label_of:
                raise ValueError(f"entry {entry_id!r} is already indexed")
            if self._hnsw is None and len(self._label_of) >= self.params.hnsw_min_entries:
                self._to_hnsw(*self._live())
            self._append(entry_id, vec)

    def remove(self, entry_id: str) -> bool:
        with self._lock:
            label = self._label_of.pop(entry_id, None)
            if label is None:
                return False
            del self._id_of[label]
            if self._hnsw is None:
                self._remove_row(label)
                return True
            self._hnsw.mark_deleted(label)
            self._deleted += 1
            if self._deleted > self.params.rebuild_deleted_fraction * max(self._next, 1):
                self._rebuild()
            return True

    def search(self, vector: np.ndarray, k: int = 1) -> list[tuple[str, float]]:
        """Up to k (entry_id, cosine) pairs, most similar first."""
        vec = self._check(vector)
        with self._lock:
            k = min(k, len(self._label_of))
            if k == 0:
                return []
            if self._hnsw is None:
                assert self._flat is not None
                sims = self._flat[: self._next] @ vec
                top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
                top = top[np.argsort(-sims[top], kind="stable")]
                return [(self._id_of[int(r)], float(sims[r])) for r in top]
            labels, dists = self._hnsw.knn_query(vec[None, :], k=k)
            return [(self._id_of[int(l)], 1.0 - float(d)) for l, d in zip(labels[0], dists[0], strict=True)]

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {vec.shape}")
        if not np.isfinite(vec).all():
            raise ValueError("vector has non-finite values")
        return vec

    # ---- the two layouts (called with the lock held) -------------------------------------------------
    def _live(self) -> tuple[np.ndarray, list[str]]:
        ids = list(self._label_of)
        if not ids:
            return np.zeros((0, self.dim), np.float32), ids
        labels = [self._label_of[i] for i in ids]
        if self._hnsw is None:
            assert self._flat is not None
            return self._flat[labels].copy(), ids
        return np.asarray(self._hnsw.get_items(labels), dtype=np.float32).reshape(-1, self.dim), ids

    def _to_flat(self, vecs: np.ndarray, ids: list[str]) -> None:
        capacity = max(self.params.initial_capacity, len(ids))
        self._flat = np.zeros((capacity, self.dim), np.float32)
        self._flat[: len(ids)] = vecs
        self._hnsw = None
        self._label_of = {entry_id: row for row, entry_id in enumerate(ids)}
        self._id_of = dict(enumerate(ids))
        self._next, self._deleted = len(ids), 0

    def _to_hnsw(self, vecs: np.ndarray, ids: list[str]) -> None:
        self._hnsw = hnswlib.Index(space="ip", dim=self.dim)
        self._hnsw.init_index(
            max_elements=max(self.params.initial_capacity, 2 * len(ids)),
            ef_construction=self.params.ef_construction,
            M=self.params.M,
        )
        self._configure()
        self._flat = None
        self._label_of, self._id_of, self._next, self._deleted = {}, {}, 0, 0
        for entry_id, vec in zip(ids, vecs, strict=True):
            self._append(entry_id, vec)

    def _configure(self) -> None:
        assert self._hnsw is not None
        self._hnsw.set_ef(self.params.ef)
        self._hnsw.set_num_threads(1)  # one query is tiny; threads only add contention on 2 cores

    def _append(self, entry_id: str, vec: np.ndarray) -> None:
        if self._hnsw is None:
            assert self._flat is not None
            if self._next >= len(self._flat):
                grown = np.zeros((2 * len(self._flat), self.dim), np.float32)
                grown[: self._next] = self._flat[: self._next]
                self._flat = grown
            self._flat[self._next] = vec
        else:
            if self._next >= self._hnsw.get_max_elements():
                self._hnsw.resize_index(max(2 * self._hnsw.get_max_elements(), 16))
            self._hnsw.add_items(vec[None, :], np.array([self._next]))
        self._label_of[entry_id] = self._next
        self._id_of[self._next] = entry_id
        self._next += 1

    def _remove_row(self, row: int) -> None:
        """Move the last row into the hole (the id maps were already updated for the removed entry)."""
        assert self._flat is not None
        last = self._next - 1
        if row != last:
            moved = self._id_of.pop(last)
            self._flat[row] = self._flat[last]
            self._label_of[moved], self._id_of[row] = row, moved
        self._next = last
        if len(self._flat) > self.params.initial_capacity and self._next <= len(self._flat) // 4:
            self._flat = self._flat[: max(self.params.initial_capacity, 2 * self._next)].copy()

    def _rebuild(self) -> None:
        """Tombstones slow searches and hold memory: copy the live vectors into a fresh graph, or back
        into a matrix when few are left."""
        vecs, ids = self._live()
        if len(ids) < self.params.hnsw_min_entries // 2:
            self._to_flat(vecs, ids)
        else:
            self._to_hnsw(vecs, ids)

    # ---- persistence ------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            meta = {
                "dim": self.dim,
                "params": asdict(self.params),
                "kind": self.kind,
                "labels": self._label_of,
                "next": self._next,
                "deleted": self._deleted,
            }
            # Write both under temporary names, then rename: a crash leaves the old pair intact.
            if self._hnsw is not None:
                meta["capacity"] = self._hnsw.get_max_elements()
                data = "index.bin"
                self._hnsw.save_index(str(folder / "index.bin.tmp"))
            else:
                assert self._flat is not None
                data = "vectors.npy"
                with open(folder / "vectors.npy.tmp", "wb") as f:
                    np.save(f, self._flat[: self._next], allow_pickle=False)
            (folder / "meta.json.tmp").write_text(json.dumps(meta))
        (folder / f"{data}.tmp").replace(folder / data)
        (folder / "meta.json.tmp").replace(folder / "meta.json")

    @classmethod
    def load(cls, folder: Path, params: IndexParams | None = None) -> VectorIndex:
        """The index saved in `folder`, searched with `params` (default: those it was saved with)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if params is None:
                fields = IndexParams.__dataclass_fields__
                params = IndexParams(**{k: v for k, v in meta["params"].items() if k in fields})
            index = cls(int(meta["dim"]), params)
            labels = {str(k): int(v) for k, v in meta["labels"].items()}
            if meta.get("kind", "hnsw") == "flat":
                vecs = np.load(folder / "vectors.npy", allow_pickle=False)
                order = sorted(labels, key=labels.__getitem__)
                if vecs.shape != (len(labels), index.dim) or [labels[i] for i in order] != list(
                    range(len(labels))
                ):
                    raise ValueError(f"vectors.npy has shape {vecs.shape} for {len(labels)} labels")
                index._to_flat(np.asarray(vecs, np.float32), order)
                return index
            index._hnsw = hnswlib.Index(space="ip", dim=index.dim)
            index._hnsw.load_index(str(folder / "index.bin"), max_elements=int(meta["capacity"]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"index folder {folder} is unreadable: {exc}") from exc
        index._configure()
        index._flat = None
        index._label_of = labels
        index._id_of = {v: k for k, v in labels.items()}
        index._next, index._deleted = int(meta["next"]), int(meta["deleted"])
        if len(index) < params.hnsw_min_entries // 2:  # e.g. saved before small scopes stayed flat
            index._rebuild()
        return index
