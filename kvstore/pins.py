"""The store's pinned keys, kept in a file beside the disk tier so pins survive a restart.

A pin is an operator's promise that an entry (a system prompt's prefix, say) is never evicted; losing it
at every restart would quietly turn it back into a cache entry. The file (`pins.msgpack` in the disk
tier's folder, a msgpack list of keys) is rewritten atomically (write, then rename) on every change:
pins change by admin call, rarely. At start the keys still stored somewhere are pinned again; the rest
(their entries were lost with the process's memory) are not, and leave the file at its next change. A
file that cannot be read is logged and ignored: pins are lost, entries never are. Without a disk tier
pins live in memory only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack

log = logging.getLogger("kvfuse.kvstore")

FILE_NAME = "pins.msgpack"
_MAX_FILE_BYTES = 64 << 20  # a million keys; anything larger is not a file we wrote


class PinSet:
    """A set of keys; with a `path`, every change is saved there and `load` reads it back."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._keys: set[str] = set()
        self._lock = threading.Lock()  # one writer of the file at a time, in the order of the changes

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        with self._lock:
            if key not in self._keys:
                self._keys.add(key)
                self._save()

    def discard(self, key: str) -> None:
        with self._lock:
            if key in self._keys:
                self._keys.discard(key)
                self._save()

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._save()

    def load(self, stored: Callable[[str], bool]) -> int:
        """Pin again the saved keys for which `stored(key)`; how many. The file is not rewritten here:
        another process on the same folder (`kvfuse store ls` beside a server) may see fewer entries
        than the store that pinned them; the next change saves what this process holds."""
        keys = self._read()
        with self._lock:
            self._keys = {k for k in keys if stored(k)}
        return len(self._keys)

    def _read(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        try:
            if self.path.stat().st_size > _MAX_FILE_BYTES:
                raise ValueError(f"{self.path.stat().st_size} bytes")
            keys = msgpack.unpackb(self.path.read_bytes())
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"not a list of keys but {type(keys).__name__}")
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.warning("pins file %s unreadable (%s): starting with no pins", self.path, e)
            return []
        return keys

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(msgpack.packb(sorted(self._keys)))
            os.replace(tmp, self.path)
        except OSError as e:  # a full or read-only disk must not fail the pin itself
            log.warning("pins not saved to %s: %s", self.path, e)
            tmp.unlink(missing_ok=True)
