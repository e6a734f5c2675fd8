"""Seeding and determinism: the process's RNGs, the data-loader workers', threads and deterministic kernels."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import Config


def set_determinism(config: Config) -> None:
    """Apply ``run.threads`` and ``run.deterministic`` (deterministic kernels, no cuDNN autotuning)."""
    if config["run"]["threads"] > 0:
        torch.set_num_threads(config["run"]["threads"])
    if config["run"]["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: seed a worker's NumPy and Python RNGs from its torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
