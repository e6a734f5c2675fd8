"""Training-state checkpoints: written atomically, holding everything a bit-exact resume needs."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

#: Marks a file as a facd_fast training state (as opposed to an exported model).
TRAINING_STATE_KEY = "facd_fast_training_state"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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

