"""Mixed precision: the autocast context of ``train.amp`` on a device (shared by the trainer and the benchmarks)."""
from __future__ import annotations

import torch


def autocast_for(device: torch.device, amp: str) -> torch.autocast:
    """bf16 autocast when ``amp`` is "bf16", or "auto" on CUDA; a disabled autocast otherwise ("off", "auto" on CPU)."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
