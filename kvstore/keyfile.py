"""A set of keys kept in a small file (a msgpack list), written atomically: bookkeeping that must survive
a restart because forgetting it would serve wrong data (the disk tier's removed-but-undeleted entries,
the store's shadowed Redis keys). Callers decide what an unreadable file means."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import msgpack

MAX_FILE_BYTES = 64 << 20  # a million keys; anything larger is not a file we wrote


def read_keys(path: Path) -> list[str]:
    """The keys saved at `path` ([] when there is no file); ValueError when it is not such a file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return []
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a key file holds")
    try:
        keys = msgpack.unpackb(path.read_bytes())
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"{path}: not msgpack ({e})") from e
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: not a list of keys but {type(keys).__name__}")
    return keys


def write_keys(path: Path, keys: Iterable[str]) -> None:
    """Replace the file with `keys` (write a temp file, then rename); remove it when there are none.
    OSError when the folder refuses."""
    keys = sorted(keys)
    if not keys:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(msgpack.packb(keys))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
