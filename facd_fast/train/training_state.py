"""Training-state checkpoints: written atomically, holding everything a bit-exact resume needs."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ..atomic_files import atomic_write

#: Marks a file as a facd_fast training state (as opposed to an exported model).
TRAINING_STATE_KEY = "facd_fast_training_state"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through :func:`facd_fast.atomic_files.atomic_write`: a reader (or a crash) never sees half a file."""
    atomic_write(path, lambda file: torch.save(obj, file))


def rng_states() -> Dict[str, Any]:
    """The global RNG states the training loop draws from (data augmentation, crops, init)."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_training_state(path: str | Path) -> Dict[str, Any]:
    """Read a checkpoint written by the trainer; a clear error for anything else."""
    from ..models import check_finite, read_checkpoint

    state = read_checkpoint(path)
    if not state.get(TRAINING_STATE_KEY):
        raise ValueError(f"{str(path)!r} is not a facd_fast training checkpoint (no {TRAINING_STATE_KEY!r} marker)")
    for part in ("model", "adapters", "ema"):
        if state.get(part) is not None:
            check_finite(state[part], f"checkpoint {path} ({part})")
    return state

