"""Documents without Redis: in memory, optionally mirrored to one msgpack file per entry in a folder.

Files are written to a temporary name and renamed, so a crash leaves either the old or the new file;
an unreadable file is skipped (a miss), never served.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from semcache.store import Entry

log = logging.getLogger(__name__)


class LocalStore:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._docs: dict[str, Entry] = {}
        self._epoch: str | None = None
        self._settings: bytes | None = None
        self._lock = threading.Lock()
        if self.folder is not None:
            self._load_folder()

    def _path(self, entry_id: str) -> Path:
        assert self.folder is not None
        return self.folder / "docs" / entry_id[:2] / f"{entry_id}.msgpack"

    def _load_folder(self) -> None:
        assert self.folder is not None
        (self.folder / "docs").mkdir(parents=True, exist_ok=True)
        marker = self.folder / "epoch"
        self._epoch = marker.read_text().strip() if marker.is_file() else None
        settings = self.folder / "categories.json"
        self._settings = settings.read_bytes() if settings.is_file() else None
        now = time.time()
        for path in (self.folder / "docs").glob("*/*.msgpack"):
            try:
                entry = Entry.decode(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("semcache: skipping unreadable document %s: %s", path, exc)
                continue
            if entry.expired(now):
                path.unlink(missing_ok=True)  # stale on disk: a restart must not revive it
            else:
                self._docs[entry.id] = entry

    def epoch(self) -> str | None:
        return self._epoch

    def ensure_epoch(self) -> str:
        with self._lock:
            if self._epoch is None:
                self._epoch = uuid.uuid4().hex
                if self.folder is not None:
                    (self.folder / "epoch").write_text(self._epoch)
            return self._epoch

    def log_position(self) -> str:
        return "0-0"  # one process owns a local store: there is nobody else's change to follow

    def read_log(self, after: str, count: int = 10_000) -> tuple[list[tuple[str, list[str]]], str, bool]:
        return [], after, False

    def get_settings(self) -> bytes | None:
        return self._settings

    def put_settings(self, raw: bytes) -> None:
        self._settings = raw
        if self.folder is not None:
            tmp = self.folder / "categories.json.tmp"
            tmp.write_bytes(raw)
            tmp.replace(self.folder / "categories.json")

    def put(self, entry: Entry) -> None:
        with self._lock:
            self._docs[entry.id] = entry
        if self.folder is not None:
            path = self._path(entry.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(entry.encode())
            tmp.replace(path)

    def wake(self) -> None:
        """Nothing to wake: the documents are in this process."""

    def get_many(self, ids: list[str]) -> tuple[dict[str, Entry], str | None]:
        now = time.time()
        with self._lock:
            found = {i: self._docs[i] for i in ids if i in self._docs}
        return {i: e for i, e in found.items() if not e.expired(now)}, self._epoch

    def delete(self, ids: list[str]) -> None:
        with self._lock:
            for entry_id in ids:
                self._docs.pop(entry_id, None)
        if self.folder is not None:
            for entry_id in ids:
                self._path(entry_id).unlink(missing_ok=True)

    def scan(self) -> Iterator[Entry]:
        now = time.time()
        with self._lock:
            docs = list(self._docs.values())
        yield from (e for e in docs if not e.expired(now))

    def clear(self) -> None:
        self.delete(list(self._docs))

    def describe(self) -> dict:
        return {
            "backend": "local",
            "folder": str(self.folder) if self.folder else None,
            "reachable": True,
            "documents": len(self._docs),
        }
