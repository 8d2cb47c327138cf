"""Per-scope bookkeeping for quotas, expiry sweeps and LRU eviction (deciding, not doing).

The ledger knows each entry's size and expiry in recency order; the cache asks it which entries to
evict or sweep and then removes them from the index and the store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from semcache.scope import Scope


class Ledger:
    def __init__(self) -> None:
        self._scopes: dict[Scope, OrderedDict[str, tuple[int, float]]] = {}
        self._bytes: dict[Scope, int] = {}
        self._scope_of: dict[str, Scope] = {}
        self._lock = threading.Lock()

    def add(self, scope: Scope, entry_id: str, nbytes: int, expires: float) -> None:
        with self._lock:
            rows = self._scopes.setdefault(scope, OrderedDict())
            if entry_id in rows:
                self._bytes[scope] -= rows[entry_id][0]
            rows[entry_id] = (nbytes, expires)
            rows.move_to_end(entry_id)
            self._scope_of[entry_id] = scope
            self._bytes[scope] = self._bytes.get(scope, 0) + nbytes

    def touch(self, scope: Scope, entry_id: str) -> None:
        with self._lock:
            rows = self._scopes.get(scope)
            if rows is not None and entry_id in rows:
                rows.move_to_end(entry_id)

    def remove(self, scope: Scope, entry_id: str) -> None:
        with self._lock:
            rows = self._scopes.get(scope)
            if rows is not None and entry_id in rows:
                self._bytes[scope] -= rows.pop(entry_id)[0]
                self._scope_of.pop(entry_id, None)
                if not rows:
                    del self._scopes[scope], self._bytes[scope]

    def over_quota(self, scope: Scope, max_entries: int, max_bytes: int) -> list[str]:
        """Least recently used entries to drop so the scope fits both quotas."""
        with self._lock:
            rows = self._scopes.get(scope, OrderedDict())
            count, size, victims = len(rows), self._bytes.get(scope, 0), []
            for entry_id, (nbytes, _) in rows.items():
                if count <= max_entries and size <= max_bytes:
                    break
                victims.append(entry_id)
                count, size = count - 1, size - nbytes
            return victims

    def expired(self, now: float) -> list[tuple[Scope, str]]:
        with self._lock:
            return [(s, i) for s, rows in self._scopes.items() for i, (_, exp) in rows.items() if exp <= now]

    def scope_of(self, entry_id: str) -> Scope | None:
        return self._scope_of.get(entry_id)

    def scopes(self) -> list[Scope]:
        with self._lock:
            return list(self._scopes)

    def ids(self, scope: Scope) -> list[str]:
        with self._lock:
            return list(self._scopes.get(scope, ()))

    def usage(self, scope: Scope) -> tuple[int, int]:
        with self._lock:
            return len(self._scopes.get(scope, ())), self._bytes.get(scope, 0)

    def clear(self) -> None:
        with self._lock:
            self._scopes.clear()
            self._bytes.clear()
            self._scope_of.clear()
