"""Data-parallel setup: this process's place in a torchrun job, and the check that replicas agree."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device_setting: str) -> Tuple[ProcessGroup, torch.device]:
    """Join the torchrun job described by the environment (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    group = ProcessGroup(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if group.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return group, device


def replica_max_abs_diff(module: nn.Module) -> float:
    """Largest |w_rank - w_rank0| over all weights and ranks: 0 when the data-parallel replicas agree."""
    largest = torch.zeros((), dtype=torch.float64)
    for tensor in module.state_dict().values():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if tensor.is_floating_point():
            largest = torch.maximum(largest, (tensor.detach() - reference).abs().max().double().cpu())
    largest = largest.to(next(module.parameters()).device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)
