"""StoreConfig: every knob of the tiered store in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass
class StoreConfig:
    """Which tiers exist, how big each is, and how the slow ones are written.

    Tiers, fastest first; a tier with 0 bytes (or no path/URL) is absent:
        device_bytes: accelerator memory tier (needs CUDA; 0 on a CPU-only machine). device: its device.
        host_bytes: host RAM tier: a pool of this many bytes that puts copy into and gets read from
            without a copy (no serialization). The pool is reserved at start and its pages are faulted
            in as they are first used (RSS grows up to host_bytes and stays).
        host_prefault: touch the whole host pool at start (RSS = host_bytes at once, ~0.5 s per GiB)
            so that even the first puts run at memcpy speed.
        host_min_entry_bytes: the least an entry is charged (and given) in the host pool. Each entry
            also costs ~2.4 KB of Python objects outside the pool (measured: 100k 16-byte entries grew a
            server by 238 MiB), so without a minimum, tiny entries could hold many times host_bytes.
            The server sets 4096 (its clients choose entry sizes); 0 charges tensor bytes only.
        lease_wait_s: a host put that finds no free block after evicting everything evictable (readers
            still hold evicted blocks via get(copy=False)) waits this long for them, then goes to the
            next tier.
        disk_path / disk_bytes: local disk tier folder and byte budget (file sizes). disk_fsync: fsync
            every file (survives power loss; a process restart is survived without it).
        disk_read_pool_bytes: reusable memory disk reads land in (no fresh pages per read; touched at
            start, in huge pages, so it counts in the process's memory from the start); a read that
            finds it full (callers hold many read entries) uses fresh memory instead.
        redis_url / redis_bytes: shared Redis tier (redis://, rediss://, unix://, redis+cluster://) and
            its byte budget, counted across every process using the same redis_prefix.
        redis_ttl_s: optional expiry of Redis entries. redis_timeout_s: socket timeout per call.
        redis_retry_s: after a Redis failure, skip the tier for this long before trying it again.
    Writing:
        write_behind: demotions and puts into disk/Redis happen on a worker thread; the caller never waits
            for them. The entry stays readable (from the pending map) until it is written.
        write_queue: bound on queued slow writes (entries). When the queue is full the caller waits for
            room (back-pressure): nothing is dropped and memory stays bounded (writing it itself could
            overtake an older queued write of the same key).
        write_through: also copy every put to each slow tier in the background, so other processes sharing
            the disk folder or Redis see it at once instead of only after demotion.
        persist_on_close: `close()` copies entries held only in memory into the first slow tier, so a
            restart keeps them (as long as that tier has room).
    """

    host_bytes: int = 4 * GiB
    host_prefault: bool = False
    host_min_entry_bytes: int = 0
    lease_wait_s: float = 1.0
    device_bytes: int = 0
    device: str = "cuda"
    disk_path: str | None = None
    disk_bytes: int = 32 * GiB
    disk_fsync: bool = False
    disk_read_pool_bytes: int = 64 << 20
    redis_url: str | None = None
    redis_bytes: int = 32 * GiB
    redis_prefix: str = "kvfuse:"
    redis_ttl_s: int | None = None
    redis_timeout_s: float = 2.0
    redis_retry_s: float = 5.0
    write_behind: bool = True
    write_queue: int = 64
    write_through: bool = False
    persist_on_close: bool = True

    def __post_init__(self) -> None:
        sizes = ("host_bytes", "device_bytes", "disk_bytes", "redis_bytes", "disk_read_pool_bytes")
        for name in (*sizes, "host_min_entry_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"StoreConfig.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.write_queue, int) or self.write_queue < 1:
            raise ValueError(f"StoreConfig.write_queue must be an int >= 1, got {self.write_queue!r}")
        if not isinstance(self.lease_wait_s, int | float) or self.lease_wait_s < 0:
            raise ValueError(f"StoreConfig.lease_wait_s must be a number >= 0, got {self.lease_wait_s!r}")
        for name in ("redis_timeout_s", "redis_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StoreConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ValueError(f"StoreConfig.redis_ttl_s must be > 0 or None, got {self.redis_ttl_s!r}")
        if not (self.host_bytes or self.device_bytes or self.disk_path or self.redis_url):
            raise ValueError(
                "StoreConfig enables no tier: set host_bytes, device_bytes, disk_path or redis_url"
            )
