"""A set of keys kept in a small file (a msgpack list), written atomically: bookkeeping that must survive
a restart because forgetting it would serve wrong data (the disk tier's removed-but-undeleted entries,
the store's shadowed Redis keys). Callers decide what an unreadable file means."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import msgpack

# write_keys never writes more (so read_keys never refuses a file we wrote): a million keys of ~1 KiB,
# the store's shadow cap (64 MiB refused a full set of 62-char keys, and ~330k of the service's 200)
MAX_FILE_BYTES = 1 << 30


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
    """Replace the file with `keys`, in the order given (the disk tier's removed keys: oldest first),
    by writing a temp file, then renaming it; remove the file when there are none. OSError when the
    folder refuses."""
    keys = list(keys)
    if not keys:
        path.unlink(missing_ok=True)
        return
    data = msgpack.packb(keys)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(
            errno.EFBIG, f"{len(keys)} keys take {len(data)} bytes, more than a key file holds", str(path)
        )
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        # durable before it replaces the old file: after a power cut a renamed-but-empty file would stop
        # the next start, and a lost rename would forget what the file must remember
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
