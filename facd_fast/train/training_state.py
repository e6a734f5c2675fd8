"""Training-state checkpoints: written atomically, holding everything a bit-exact resume needs."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from ..atomic_files import atomic_write

#: Marks a file as a facd_fast training state (as opposed to an exported model).
TRAINING_STATE_KEY = "facd_fast_training_state"
CHECKPOINT_NAME = "last.pt"


def run_files(out_dir: Path, stage: str) -> List[Path]:
    """The files and folders a run of ``stage`` writes into its folder ``out_dir`` that exist there now."""
    names = [f"checkpoints/{CHECKPOINT_NAME}", "log.jsonl", "config.toml", f"{stage}.pth", "curves.png",
             "comparison.png", "tensorboard"]
    return [out_dir / name for name in names if (out_dir / name).exists()]


def files_to_replace(out_dir: Path, stage: str, resume: bool, overwrite: bool) -> List[Path]:
    """What ``overwrite`` will delete; FileExistsError when the folder holds a run and neither flag is given."""
    existing = run_files(out_dir, stage)
    if existing and not (resume or overwrite):
        listed = ", ".join(str(path.relative_to(out_dir)) for path in existing)
        raise FileExistsError(f"run.out_dir: {out_dir} already holds a {stage} run ({listed}); pass --resume to "
                              f"continue it, --overwrite to replace it, or set another run.out_dir")
    return existing if overwrite else []


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


def _rng_states_of_all_ranks(group) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (collective: all ranks must call it)."""
    if not group.distributed:
        return [rng_states()]
    states: List[Any] = [None] * group.world_size
    dist.all_gather_object(states, rng_states())
    return states


@dataclass
class RunCounters:
    """Where a run is: steps taken, the epoch and the batches done in it, time, the last validation, skips."""

    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0
    elapsed_s: float = 0.0
    last_val_psnr: float = float("nan")
    skipped_steps: int = 0

    @classmethod
    def restore(cls, state: Dict[str, Any], path: Path, model, optimizer, scheduler, ema, group) -> "RunCounters":
        """Load a training state into the distiller ``model``, the optimiser, schedule and EMA; the counters it held."""
        from .config import ConfigError

        model.student.load_state_dict(state["model"])
        if model.trainable.adapters is not None:
            model.trainable.adapters.load_state_dict(state["adapters"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            if state["ema"] is None:
                raise ConfigError(f"{path} holds no EMA weights but train.ema_decay > 0")
            ema.load_state_dict(state["ema"])
        if len(state["rng"]) != group.world_size:
            raise ConfigError(f"{path} was written by {len(state['rng'])} process(es), this run has "
                              f"{group.world_size}: resume with as many processes")
        restore_rng_states(state["rng"][group.rank])
        return cls(**{f.name: state.get(f.name, f.default) for f in fields(cls)})


def save_training_state(path: Path, trainer, write: bool) -> None:
    """The trainer's state to ``path`` (collective under DDP: every rank gives its RNG states; ``write`` on rank 0 only).

    Never a non-finite weight: ValueError naming the part, and nothing written.
    """
    from ..models import check_finite, model_meta

    adapters = trainer.model.trainable.adapters
    state = {
        TRAINING_STATE_KEY: True, "mode": trainer.mode, "method": trainer.method, "config": trainer.config,
        **asdict(trainer.counters),
        "model_meta": model_meta(trainer.student), "model": trainer.student.state_dict(),
        "adapters": None if adapters is None else adapters.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "ema": None if trainer.ema is None else trainer.ema.state_dict(),
        "rng": _rng_states_of_all_ranks(trainer.group),
        "teacher_precision": trainer.model.teacher_precision if trainer.teacher is not None else None,
        "config_history": trainer.config_history,
    }
    if not write:
        return
    for part in ("model", "adapters", "ema"):
        if state[part] is not None:
            check_finite(state[part], f"refusing to write {path}: {part}")
    atomic_torch_save(state, path)


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
