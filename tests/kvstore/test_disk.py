"""Disk tier: survives restarts, never returns a torn or corrupt file, cleans up after crashes."""

from __future__ import annotations

import os
import threading

import torch
from kvstore_helpers import ENTRY_BYTES, SMOL, tiny_entry

from kvstore import Entry, KVConnector, Namespace, StoreConfig, TieredStore
from kvstore.tiers import DiskTier


def _key(i: int) -> str:
    return f"{i:032x}"


def test_restart_keeps_every_entry_and_the_lru_order(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    for i in range(6):
        disk.put(tiny_entry(_key(i), seed=i))
    disk.get(_key(1))
    order = disk.keys()
    assert order[-1] == _key(1)
    again = DiskTier(tmp_path, 1 << 20)
    assert again.keys() == order
    assert again.usage() == disk.usage()
    for i in range(6):
        assert torch.equal(again.get(_key(i)).kv, tiny_entry(_key(i), seed=i).kv)


def test_restart_of_a_store_keeps_its_prefixes(tmp_path):
    ns = Namespace("m", SMOL)
    tokens = list(range(100, 150))
    kv = torch.randn(SMOL.chunk_shape(50)).half()
    config = StoreConfig(host_bytes=1 << 20, disk_path=str(tmp_path))
    with TieredStore(config) as store:
        KVConnector(store, ns).store(tokens, kv)
        store.flush()
        assert KVConnector(store, ns).lookup(tokens) == 50
    with TieredStore(config) as store:  # a fresh process would see the same folder
        conn = KVConnector(store, ns)
        assert conn.lookup(tokens) == 50
        assert torch.equal(conn.retrieve(tokens).kv, kv)


def test_truncated_file_is_a_miss_and_is_removed(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.put(tiny_entry(_key(1)))
    path = disk.path(_key(1))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    assert disk.get(_key(1)) is None
    assert not path.exists() and not disk.contains(_key(1)) and disk.corrupt == 1
    assert disk.usage().bytes == 0


def test_corrupt_file_is_a_miss_and_is_removed(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    for i in range(3):
        disk.put(tiny_entry(_key(i), seed=i))
    path = disk.path(_key(2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor bytes
    path.write_bytes(data)
    restarted = DiskTier(tmp_path, 1 << 20)  # the index does not read files, so it still lists it
    assert restarted.contains(_key(2))
    assert restarted.get(_key(2)) is None and not path.exists()
    assert torch.equal(restarted.get(_key(0)).kv, tiny_entry(_key(0), seed=0).kv)


def test_a_file_renamed_to_another_key_is_not_served(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.put(tiny_entry(_key(1)))
    os.makedirs(disk.path(_key(2)).parent, exist_ok=True)
    os.replace(disk.path(_key(1)), disk.path(_key(2)))
    again = DiskTier(tmp_path, 1 << 20)
    assert again.get(_key(2)) is None and again.corrupt == 1


def test_crash_leftovers_are_cleaned_and_foreign_files_ignored(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.put(tiny_entry(_key(1)))
    sub = disk.path(_key(1)).parent
    (sub / f".tmp-{_key(9)}-abc").write_bytes(b"half a write")
    (tmp_path / "README.txt").write_text("not an entry")
    again = DiskTier(tmp_path, 1 << 20)
    assert again.keys() == [_key(1)]
    assert not (sub / f".tmp-{_key(9)}-abc").exists() and (tmp_path / "README.txt").exists()


def test_lowered_capacity_trims_the_oldest_at_start(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    for i in range(4):
        disk.put(tiny_entry(_key(i), seed=i))
    size = disk.size_of(_key(0))
    again = DiskTier(tmp_path, 2 * size)
    assert again.keys() == [_key(2), _key(3)] and again.usage().bytes <= 2 * size


def test_bfloat16_and_float32_survive_the_disk(tmp_path):
    disk = DiskTier(tmp_path, 1 << 22)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        layout = type(SMOL)(30, 3, 64, dtype, 16)
        kv = torch.randn(layout.chunk_shape(5)).to(dtype)
        key = f"{str(dtype)[6:]:0>32}"
        disk.put(Entry.plain(key, layout, kv))
        assert torch.equal(DiskTier(tmp_path, 1 << 22).get(key).kv.view(torch.uint8), kv.view(torch.uint8))


def _drop_from_page_cache(path, keep: int = 0) -> None:
    """Evict a file from the page cache, then read its first `keep` bytes back in (buffered)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if keep:
            os.pread(fd, keep, 0)
    finally:
        os.close(fd)


def test_reads_are_exact_from_the_page_cache_the_device_or_both(tmp_path):
    """A read copies what the page cache holds and takes the rest with O_DIRECT (block-aligned, into
    the read pool): cold, half-cached and hot files all give the stored bytes; with O_DIRECT switched
    off (a file system that refuses it) the rest is read buffered."""
    disk = DiskTier(tmp_path, 64 << 20)
    kv = torch.randn(SMOL.chunk_shape(300)).half()  # ~2.1 MiB: many blocks, an unaligned file size
    entry = Entry.plain(_key(1), SMOL, kv, torch.arange(300))
    disk.put(entry)
    path = disk.path(entry.key)
    assert os.path.getsize(path) % 4096  # the last block is partial
    for direct in (True, False):
        disk._direct = direct
        for keep in (0, 4096 * 100 + 123, os.path.getsize(path)):
            _drop_from_page_cache(path, keep)
            got = disk.get(entry.key)
            assert torch.equal(got.kv, kv) and torch.equal(got.positions, entry.positions)
        if direct:  # this file system (ext4 here and in CI) takes O_DIRECT: no silent fallback
            assert disk._direct
    assert disk.corrupt == 0


def _chattr(flag: str, path) -> bool:
    """Set or clear the immutable attribute (root on ext4, as here and in CI); False where refused."""
    import shutil
    import subprocess

    chattr = shutil.which("chattr")
    return (
        chattr is not None and subprocess.run([chattr, flag, str(path)], capture_output=True).returncode == 0
    )


def test_a_failed_rename_leaves_the_index_describing_the_old_file(tmp_path):
    """os.replace fails (the old file is immutable: EPERM, even for root): the index must go on
    describing the old file, not claim the new entry's checksum and size."""
    import pytest

    disk = DiskTier(tmp_path, 1 << 20)
    old, new = tiny_entry(_key(1), seed=1), tiny_entry(_key(1), tokens=8, seed=2)
    disk.put(old)
    assert disk.get(old.key) is not None  # the read records the old file's checksum
    before = (disk.checksum_of(old.key), disk.size_of(old.key), disk.usage())
    path = disk.path(old.key)
    if not _chattr("+i", path):
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        with pytest.raises(PermissionError):
            disk.put(new)
    finally:
        _chattr("-i", path)
    assert (disk.checksum_of(old.key), disk.size_of(old.key), disk.usage()) == before
    assert torch.equal(disk.get(old.key).kv, old.kv)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


class _PausedReadDisk(DiskTier):
    """A disk tier whose reads wait for `resume` once the file's bytes are in (a slow reader)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pause, self.read_done, self.resume = False, threading.Event(), threading.Event()

    def _read(self, path):
        out = super()._read(path)
        if self.pause:
            self.read_done.set()
            self.resume.wait(10)
        return out


def test_a_read_does_not_record_the_checksum_of_a_file_replaced_meanwhile(tmp_path):
    """A get read version 1; a put replaced the file with version 2 before the get stored what it
    read in the index: the index must keep version 2's checksum (an eviction skips its write-down
    when the checksums match, so a wrong one would keep version 1 under a newer copy)."""
    disk = _PausedReadDisk(tmp_path, 1 << 20)
    v1, v2 = tiny_entry(_key(1), seed=1), tiny_entry(_key(1), seed=2)
    disk.put(v1)
    disk.pause = True
    got: list = []
    reader = threading.Thread(target=lambda: got.append(disk.get(v1.key)))
    reader.start()
    assert disk.read_done.wait(10)
    disk.put(v2)
    newest = disk.checksum_of(v1.key)
    disk.resume.set()
    reader.join()
    assert torch.equal(got[0].kv, v1.kv)  # the reader gets what it read
    assert disk.checksum_of(v1.key) == newest
    disk.pause = False
    assert torch.equal(disk.get(v1.key).kv, v2.kv) and disk.checksum_of(v1.key) == newest


def test_a_removed_entry_whose_file_cannot_be_deleted_stays_removed_after_a_restart(tmp_path):
    """unlink fails (the file is immutable: EPERM, even for root): the entry is forgotten at once and
    named in removed.msgpack, so a restart skips the file instead of serving it, and deletes it once
    it can."""
    import pytest

    from kvstore.tiers.disk import REMOVED_FILE

    disk = DiskTier(tmp_path, 1 << 20)
    gone, kept = tiny_entry(_key(1), seed=1), tiny_entry(_key(2), seed=2)
    disk.put(gone)
    disk.put(kept)
    path = disk.path(gone.key)
    if not _chattr("+i", path):
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        assert disk.remove(gone.key) > 0
        assert not disk.contains(gone.key) and disk.get(gone.key) is None and path.exists()
        again = DiskTier(tmp_path, 1 << 20)  # the file is still there: it is not indexed
        assert again.keys() == [kept.key] and (tmp_path / REMOVED_FILE).exists()
    finally:
        _chattr("-i", path)
    again = DiskTier(tmp_path, 1 << 20)  # now it can be deleted: it is, and the record goes
    assert again.keys() == [kept.key] and not path.exists() and not (tmp_path / REMOVED_FILE).exists()
    again.put(gone)  # and the key can be stored again
    assert torch.equal(DiskTier(tmp_path, 1 << 20).get(gone.key).kv, gone.kv)


def test_a_put_over_a_removed_but_undeleted_file_is_kept_by_a_restart(tmp_path):
    import pytest

    from kvstore.tiers.disk import REMOVED_FILE

    disk = DiskTier(tmp_path, 1 << 20)
    old, new = tiny_entry(_key(1), seed=1), tiny_entry(_key(1), seed=2)
    disk.put(old)
    path = disk.path(old.key)
    if not _chattr("+i", path):
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        disk.remove(old.key)
        assert (tmp_path / REMOVED_FILE).exists()
    finally:
        _chattr("-i", path)
    disk.put(new)  # replaces the file: the record of the removal goes
    assert not (tmp_path / REMOVED_FILE).exists()
    assert torch.equal(DiskTier(tmp_path, 1 << 20).get(new.key).kv, new.kv)


def test_a_store_remove_that_cannot_delete_or_record_is_a_fault_and_the_entry_stays_unserved(tmp_path):
    """The folder itself is immutable too: neither the file nor the record can be written. The store's
    remove still forgets the entry (never served by this process) and reports the disk's fault."""
    import pytest

    from kvstore.tiers import HostTier

    disk = DiskTier(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(write_behind=False), tiers=[HostTier(ENTRY_BYTES), disk])
    k = _key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(_key(2)))  # k written down
    assert disk.contains(k)
    path = disk.path(k)
    if not (_chattr("+i", path) and _chattr("+i", disk.root)):
        _chattr("-i", path)
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        assert store.remove(k)
        assert store.get(k) is None and not store.contains(k)
        health = store.health()["tiers"]["disk"]
        assert not health["ok"] and "Operation not permitted" in health["error"]
        assert store.stats()["tiers"]["disk"]["faults"] == 1
    finally:
        _chattr("-i", disk.root)
        _chattr("-i", path)
    store.close()


def test_a_store_restart_does_not_bring_back_an_entry_removed_while_its_file_was_stuck(tmp_path):
    import pytest

    from kvstore.tiers import HostTier

    def open_store() -> TieredStore:
        disk = DiskTier(tmp_path / "disk", 1 << 20)
        return TieredStore(StoreConfig(write_behind=False), tiers=[HostTier(ENTRY_BYTES), disk])

    store = open_store()
    k = _key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(_key(2)))  # k written down
    path = store.tiers[1].path(k)
    if not _chattr("+i", path):
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        assert store.remove(k)
        assert store.health()["ok"]  # recorded: nothing for an operator to do
        store.close()
        again = open_store()
        assert again.get(k) is None and again.lookup([k]) == 0
        again.close()
    finally:
        _chattr("-i", path)


def test_a_corrupt_file_that_cannot_be_deleted_is_a_miss_and_stays_forgotten(tmp_path):
    """The corrupt file's unlink fails (the file is immutable: EPERM, even for root): the get raised
    that PermissionError to its caller. It is a miss; the key is forgotten and recorded as a remove's
    is (so the next start does not index the file, and deletes it once it can); the tier counts a
    fault, and so does the store's stats."""
    import pytest

    from kvstore.tiers import HostTier

    disk = DiskTier(tmp_path / "disk", 1 << 20)
    store = TieredStore(StoreConfig(write_behind=False), tiers=[HostTier(ENTRY_BYTES), disk])
    k = _key(1)
    store.put(tiny_entry(k, seed=1))
    store.put(tiny_entry(_key(2)))  # k written down
    path = disk.path(k)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if not _chattr("+i", path):
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    try:
        assert disk.get(k) is None  # (raised PermissionError)
        assert not disk.contains(k) and path.exists() and (disk.corrupt, disk.faults) == (1, 1)
        assert store.get(k) is None and disk.corrupt == 1  # forgotten: not read again
        assert store.stats()["tiers"]["disk"]["faults"] == 1
        assert DiskTier(tmp_path / "disk", 1 << 20).keys() == []  # nor indexed by a restart
    finally:
        _chattr("-i", path)
    store.close()  # persists the host tier's entry
    assert DiskTier(tmp_path / "disk", 1 << 20).keys() == [_key(2)] and not path.exists()  # deleted now


class _VanishingDisk(DiskTier):
    """A disk tier whose next read finds the file gone, and a put of `fresh` landing right after."""

    fresh: Entry | None = None

    def _read(self, path):
        if self.fresh is None:
            return super()._read(path)
        fresh, self.fresh = self.fresh, None
        os.unlink(path)  # removed by hand (or another process) ...
        self.put(fresh)  # ... and put again before the reader forgets it
        raise FileNotFoundError(path)


def test_a_get_that_found_the_file_gone_keeps_a_fresh_put_of_it(tmp_path):
    """The read found no file, so the get forgets the key: it deleted the file a put had written
    since (and the put's entry with it)."""
    disk = _VanishingDisk(tmp_path, 1 << 20, read_pool_bytes=1 << 20)
    disk.put(tiny_entry(_key(1), seed=1))
    disk.fresh = tiny_entry(_key(1), seed=2)
    assert disk.get(_key(1)) is None  # what it read was gone
    assert torch.equal(disk.get(_key(1)).kv, tiny_entry(_key(1), seed=2).kv)


def test_the_record_of_undeletable_removed_files_is_capped_oldest_first(tmp_path, monkeypatch):
    """removed.msgpack grew by one key per removed file that could not be deleted, without end. It
    holds at most MAX_REMOVED keys, newest last; past it the oldest record goes. Its file is tried
    once more: one deletable by then goes with it (nothing lost); one still stuck is a fault, and a
    restart indexes it again (the documented cost of the cap)."""
    import pytest

    from kvstore.keyfile import read_keys
    from kvstore.tiers import disk as disk_module

    monkeypatch.setattr(disk_module, "MAX_REMOVED", 2)
    disk = DiskTier(tmp_path, 1 << 20)
    keys = [_key(i) for i in (4, 3, 2, 1)]  # removed in this order: the record keeps it, not sorted
    for k in keys:
        disk.put(tiny_entry(k))
    paths = [disk.path(k) for k in keys]
    if not all(_chattr("+i", p) for p in paths):
        for p in paths:
            _chattr("-i", p)
        pytest.skip("chattr +i refused here (needs root and ext2/3/4)")
    record = tmp_path / disk_module.REMOVED_FILE
    try:
        disk.remove(keys[0])
        disk.remove(keys[1])
        assert read_keys(record) == keys[:2]
        _chattr("-i", paths[0])  # the oldest's file can be deleted by now
        disk.remove(keys[2])
        assert read_keys(record) == keys[1:3] and not paths[0].exists() and disk.faults == 0
        disk.remove(keys[3])  # the oldest record now is of a file still stuck
        assert read_keys(record) == keys[2:] and paths[1].exists() and disk.faults == 1
        assert disk.keys() == []  # this process serves none of them
        assert DiskTier(tmp_path, 1 << 20).keys() == [keys[1]]  # the next start indexes that one
    finally:
        for p in paths:
            _chattr("-i", p)
