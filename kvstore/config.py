"""StoreConfig: every knob of the tiered store in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass
class StoreConfig:
    """Which tiers exist, how big each is, and how the slow ones are written.

    Tiers, fastest first; a tier with 0 bytes (or no path/URL) is absent:
        device_bytes: accelerator memory tier (needs CUDA; 0 on a CPU-only machine). device: its device.
        host_bytes: host RAM tier (tensors, no serialization).
        disk_path / disk_bytes: local disk tier folder and byte budget (file sizes). disk_fsync: fsync
            every file (survives power loss; a process restart is survived without it).
        redis_url / redis_bytes: shared Redis tier (redis://, rediss://, unix://, redis+cluster://) and
            its byte budget, counted across every process using the same redis_prefix.
        redis_ttl_s: optional expiry of Redis entries. redis_timeout_s: socket timeout per call.
        redis_retry_s: after a Redis failure, skip the tier for this long before trying it again.
    Writing:
        write_behind: demotions and puts into disk/Redis happen on a worker thread; the caller never waits
            for them. The entry stays readable (from the pending map) until it is written.
        write_queue: bound on queued slow writes (entries). When the queue is full the caller performs the
            write itself (back-pressure): nothing is dropped and memory stays bounded.
        write_through: also copy every put to each slow tier in the background, so other processes sharing
            the disk folder or Redis see it at once instead of only after demotion.
        persist_on_close: `close()` copies entries held only in memory into the first slow tier, so a
            restart keeps them (as long as that tier has room).
    """

    host_bytes: int = 4 * GiB
    device_bytes: int = 0
    device: str = "cuda"
    disk_path: str | None = None
    disk_bytes: int = 32 * GiB
    disk_fsync: bool = False
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
        for name in ("host_bytes", "device_bytes", "disk_bytes", "redis_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"StoreConfig.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.write_queue, int) or self.write_queue < 1:
            raise ValueError(f"StoreConfig.write_queue must be an int >= 1, got {self.write_queue!r}")
        for name in ("redis_timeout_s", "redis_retry_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StoreConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ValueError(f"StoreConfig.redis_ttl_s must be > 0 or None, got {self.redis_ttl_s!r}")
        if not (self.host_bytes or self.device_bytes or self.disk_path or self.redis_url):
            raise ValueError(
                "StoreConfig enables no tier: set host_bytes, device_bytes, disk_path or redis_url"
            )
