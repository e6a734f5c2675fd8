"""What ``--resume`` may change: a run folder records one truth.

A resumed run's settings are compared with those its checkpoint was trained
with. Settings that do not change what the steps compute (the iteration
count, which extends a run; log, validation and checkpoint periods; progress,
plots, threads, workers) may change, and each change is logged with the step
it took effect. A change to anything else (learning rate and schedule, loss
weights and terms, data, seed, precision) is refused, naming each key with its
recorded and its new value, unless the run is resumed with
``--resume-with-changes``; then it takes effect from the next step and is
recorded in the log, in the checkpoint and in ``config.toml``'s history. A
change of network is refused always.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

from .config import DEFAULTS, Config, ConfigError

Key = Tuple[str, str]
#: Settings a resumed run may change: they decide when things happen or how they are shown, not what a step computes.
SAFE_ON_RESUME = {
    ("run", "out_dir"), ("run", "threads"), ("data", "num_workers"),
    ("train", "iterations"), ("train", "log_every"), ("train", "val_every"), ("train", "checkpoint_every"),
    ("train", "max_bad_steps"), ("train", "progress"), ("train", "plots"), ("train", "tensorboard"),
    ("train", "grad_norms"),
}
#: The networks a run trains: never changed on resume.
ARCHITECTURE = {("model", "scale"), ("model", "student"), ("model", "student_kwargs"), ("model", "student_taps"),
                ("model", "teacher"), ("model", "teacher_kwargs"), ("model", "teacher_taps")}
#: Settings a train-teacher run does not read.
_UNUSED_BY_TEACHER_RUNS = {("model", "student"), ("model", "student_kwargs"), ("model", "student_taps"),
                           ("model", "teacher_taps"), ("model", "teacher_checkpoint")}


def recorded_config(config: Dict[str, Dict[str, Any]]) -> Config:
    """A config as a checkpoint or study recorded it, with the keys added since filled in as that run behaved.

    New keys take their defaults, which reproduce what older runs did, except
    ``distill.teacher_precision``: before it existed the teacher ran in the
    student's precision, so a missing value is "bf16" under ``train.amp = "bf16"``, else "fp32".
    """
    filled = copy.deepcopy(DEFAULTS)
    for section, values in config.items():
        filled.setdefault(section, {}).update(values)
    if "teacher_precision" not in config.get("distill", {}):
        filled["distill"]["teacher_precision"] = "bf16" if filled["train"]["amp"] == "bf16" else "fp32"
    return filled


def differences(recorded: Config, current: Config, mode: str) -> List[Tuple[Key, Any, Any]]:
    """(key, recorded value, current value) of every setting that differs (``mode``'s unused settings left out)."""
    recorded = recorded_config(recorded)
    found = []
    for section, values in current.items():
        for key, value in values.items():
            if section == "distill" and mode == "teacher" or (mode == "teacher" and (section, key) in _UNUSED_BY_TEACHER_RUNS):
                continue
            old = recorded.get(section, {}).get(key)
            if old != value:
                found.append(((section, key), old, value))
    return found


def _listed(changes: List[Tuple[Key, Any, Any]]) -> str:
    return "; ".join(f"{section}.{key} recorded {old!r}, now {new!r}" for (section, key), old, new in changes)


def check_resume(recorded: Config, current: Config, mode: str, allow_changes: bool, path, step: int,
                 precision: Optional[Tuple[str, str]] = None) -> List[Dict[str, Any]]:
    """The changes a resume from ``path`` (at ``step``) makes, as log records; ConfigError for one it may not make.

    ``precision``: the teacher's precision as recorded and as resolved now (a setting of "auto" resolves
    by the machine, so the same setting can mean another precision elsewhere).
    """
    changes = differences(recorded, current, mode)
    architecture = [c for c in changes if c[0] in ARCHITECTURE]
    if architecture:
        raise ConfigError(f"--resume: {path} holds another network: {_listed(architecture)}; a run cannot change "
                          f"its network: use another run.out_dir")
    refused = [c for c in changes if c[0] not in SAFE_ON_RESUME]
    if precision is not None and precision[0] != precision[1]:
        refused.append((("distill", "teacher_precision (resolved)"), precision[0], precision[1]))
    if refused and not allow_changes:
        raise ConfigError(f"--resume: {path} was trained to step {step} with other settings: {_listed(refused)}; "
                          f"resume with the recorded values, or pass --resume-with-changes to change them from "
                          f"step {step + 1} (recorded in the log and in config.toml)")
    return [{"key": f"{section}.{key}", "recorded": old, "now": new, "from_step": step + 1,
             "safe": (section, key) in SAFE_ON_RESUME} for (section, key), old, new in changes
            + [c for c in refused if c not in changes]]


def history_header(history: List[Dict[str, Any]]) -> str:
    """config.toml's opening comments: the settings each part of a resumed run used, when they changed."""
    if not history:
        return ""
    lines = ["# This run was resumed with other settings; this file holds those in effect since the last change.",
             "# Before each change below, the run used the recorded value:"]
    for change in history:
        lines.append(f"#   from step {change['from_step']}: {change['key']} = {change['now']!r} "
                     f"(before: {change['recorded']!r})" + ("" if change["safe"] else " [--resume-with-changes]"))
    return "\n".join(lines) + "\n\n"


def apply_optimizer_settings(optimizer, scheduler, train: Dict[str, Any]) -> None:
    """Make a restored optimiser and StepLR follow ``train``'s lr, betas, weight decay and schedule from now on.

    A restored state keeps the settings it was saved with; after an allowed change the run must use
    the new ones (from the next step), as the log and config.toml say.
    """
    scheduler.base_lrs = [train["lr"] for _ in scheduler.base_lrs]
    scheduler.step_size, scheduler.gamma = train["lr_step"], train["lr_gamma"]
    lr = train["lr"] * train["lr_gamma"] ** (scheduler.last_epoch // train["lr_step"])
    for group in optimizer.param_groups:
        group.update(lr=lr, betas=tuple(train["betas"]), weight_decay=train["weight_decay"])
        if "initial_lr" in group:
            group["initial_lr"] = train["lr"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
