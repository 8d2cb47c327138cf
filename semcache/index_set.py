"""All scope indexes of one cache, and their snapshot on disk (tagged with the store's epoch).

`max_scopes` bounds how many indexes exist at once: tenant names are free-form, so per-scope quotas
alone bound nothing in total. An insert that would open one more scope is refused (ScopeLimitReached);
an index whose last entry goes is dropped, freeing its place.

A snapshot only saves the HNSW build at start: the store stays the source of truth, and the cache
reconciles the loaded indexes against it (adds what is missing, drops what is gone).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from semcache.index import IndexParams, VectorIndex
from semcache.scope import Scope

log = logging.getLogger(__name__)


class ScopeLimitReached(Exception):
    pass


class IndexSet:
    def __init__(self, dim: int, params: IndexParams, max_scopes: int | None = None) -> None:
        self.dim, self.params, self.max_scopes = dim, params, max_scopes
        self._indexes: dict[Scope, VectorIndex] = {}

    def __len__(self) -> int:
        return len(self._indexes)

    def get(self, scope: Scope) -> VectorIndex | None:
        return self._indexes.get(scope)

    def ensure(self, scope: Scope, limited: bool = True) -> VectorIndex:
        """The scope's index, made when missing; past `max_scopes` a new one is refused unless not
        `limited` (entries already in the store: the store is the truth, they are indexed regardless)."""
        index = self._indexes.get(scope)
        if index is None:
            if limited and self.max_scopes is not None and len(self._indexes) >= self.max_scopes:
                raise ScopeLimitReached(
                    f"{len(self._indexes)} (tenant, model, category) scopes exist, the limit set by "
                    f"max_scopes (KVFUSE_SEMCACHE_MAX_SCOPES) is {self.max_scopes}: no new scope is made"
                )
            index = self._indexes[scope] = VectorIndex(self.dim, self.params)
        return index

    def drop_if_empty(self, scope: Scope) -> None:
        index = self._indexes.get(scope)
        if index is not None and len(index) == 0:
            del self._indexes[scope]

    def usage(self) -> dict:
        indexes = list(self._indexes.values())
        return {
            "scopes": len(indexes),
            "max_scopes": self.max_scopes,
            "hnsw_scopes": sum(1 for i in indexes if i.kind == "hnsw"),
            "bytes_estimated": sum(i.nbytes() for i in indexes),
        }

    def items(self) -> list[tuple[Scope, VectorIndex]]:
        return list(self._indexes.items())

    def drop(self, scope: Scope) -> None:
        self._indexes.pop(scope, None)

    def clear(self) -> None:
        self._indexes.clear()

    def save(self, folder: Path, epoch: str) -> None:
        """Write every index, then the manifest last: a manifest names only complete indexes."""
        folder.mkdir(parents=True, exist_ok=True)
        scopes = []
        for scope, index in self._indexes.items():
            index.save(folder / scope.digest())
            scopes.append(scope.to_dict())
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps({"epoch": epoch, "dim": self.dim, "scopes": scopes}))
        tmp.replace(folder / "manifest.json")
        live = {Scope(**s).digest() for s in scopes}
        for child in folder.iterdir():
            if child.is_dir() and child.name not in live:
                shutil.rmtree(child, ignore_errors=True)

    def load(self, folder: Path, epoch: str) -> str:
        """Load a snapshot saved under `epoch`; returns "loaded", "absent", "stale" or "unreadable"."""
        path = folder / "manifest.json"
        if not path.is_file():
            return "absent"
        try:
            manifest = json.loads(path.read_text())
            if manifest["epoch"] != epoch or manifest["dim"] != self.dim:
                return "stale"
            loaded = {}
            for s in manifest["scopes"]:
                scope = Scope(**s)
                loaded[scope] = VectorIndex.load(folder / scope.digest(), self.params)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("semcache: index snapshot in %s is unreadable, rebuilding: %s", folder, exc)
            return "unreadable"
        self._indexes = loaded
        return "loaded"
