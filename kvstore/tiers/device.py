"""Device tier: entries kept on an accelerator (CUDA) so a hit needs no host-to-device copy."""

from __future__ import annotations

import torch

from kvstore.tiers.host import MemoryTier


class DeviceTier(MemoryTier):
    """A MemoryTier whose tensors live on `device` (default cuda:0); ValueError if it is not available."""

    name = "device"

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        if device.type == "cpu":
            raise ValueError("DeviceTier needs an accelerator device; on CPU the host tier is the top tier")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"DeviceTier device {device} is not available (no CUDA on this machine)")
        super().__init__(capacity_bytes, device)
