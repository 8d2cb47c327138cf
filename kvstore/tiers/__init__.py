"""Tiers of the store, fastest first: device, host, disk, Redis. Same small interface (base.Tier)."""

from kvstore.tiers.base import Tier, TierFull, TierUnavailable, TierUsage
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.redis_tier import RedisTier

__all__ = [
    "DeviceTier",
    "DiskTier",
    "HostTier",
    "RedisTier",
    "Tier",
    "TierFull",
    "TierUnavailable",
    "TierUsage",
]
