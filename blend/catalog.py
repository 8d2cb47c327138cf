"""The ingested passages (id -> text), kept in memory and, with a folder, in an append-only JSONL file."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "passages.jsonl"


@dataclass(frozen=True)
class Passage:
    id: str  # blake2b of the text: the same text is one passage however often it is ingested
    doc_id: str
    text: str
    tokens: int


def passage_id(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class Catalog:
    def __init__(self, folder: str | Path | None = None) -> None:
        self._items: dict[str, Passage] = {}
        self._lock = threading.Lock()
        self.path = Path(folder) / FILE if folder is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                p = Passage(**json.loads(line))
            except (ValueError, TypeError) as e:
                # a torn last line (crash mid-append) is skipped; the passage is re-added on re-ingest
                if n == len(lines):
                    break
                raise ValueError(f"{self.path}:{n} is not a passage record: {e}") from None
            self._items[p.id] = p

    def add(self, passages: list[Passage]) -> None:
        with self._lock:
            new = [p for p in passages if p.id not in self._items]
            for p in new:
                self._items[p.id] = p
            if self.path is not None and new:
                with self.path.open("a") as f:
                    f.writelines(json.dumps(asdict(p)) + "\n" for p in new)

    def get(self, pid: str) -> Passage:
        try:
            return self._items[pid]
        except KeyError:
            raise ValueError(f"unknown passage id {pid!r}: ingest it first") from None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items.values()))
