"""The divergence guard: a step whose loss or gradient holds NaN/Inf changes no weight; too many in a row stop the run."""
from __future__ import annotations

import sys
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradient; the run stopped."""


def non_finite(loss: Tensor, terms: Dict[str, Tensor], named_parameters: Iterable[Tuple[str, Tensor]],
               distributed: bool) -> Optional[str]:
    """None when the loss and every gradient are finite (on every rank), else what was not.

    One host synchronisation per step; the names are looked up only after a bad step.
    """
    named_parameters = list(named_parameters)
    grads = [p.grad for _, p in named_parameters if p.grad is not None]
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if grads:
        # One fused pass over every gradient (GradScaler's check; scaling by 1 leaves each value as it is).
        found = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=grads[0].device))
        bad = torch.maximum(bad, found.to(bad.device))
    if distributed:  # every rank must skip together, or DDP's replicas drift apart
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return None
    for name, value in terms.items():
        if value.numel() == 1 and not torch.isfinite(value):
            return f"the {name} term is {float(value)}"
    for name, parameter in named_parameters:
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            return f"the gradient of {name} holds NaN/Inf"
    return "another process's loss or gradient is non-finite"


class DivergenceGuard:
    """Counts skipped steps and logs them; :meth:`skipped` stops the run after ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int, skipped_steps: int = 0) -> None:
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = skipped_steps
        self.streak = 0

    def passed(self) -> None:
        self.streak = 0

    def skipped(self, step: int, problem: str, saved: str, lr: float, log, bar=None, warn: bool = True) -> None:
        """Count and log a skipped ``step`` (a warning on the first of a streak); TrainingDiverged once the
        streak reaches ``max_bad_steps``. ``saved`` says what the checkpoint on disk holds; ``lr`` is
        train.lr, named in the advice."""
        self.skipped_steps += 1
        self.streak += 1
        log.write("skip", step, {"problem": problem, "in_a_row": self.streak, "skipped_steps": self.skipped_steps})
        if bar is not None:
            bar.set_postfix(skipped=self.skipped_steps, refresh=False)
        if self.streak == 1 and warn:
            print(f"facd: warning: step {step}: {problem}; the step is skipped (no weight changed)", file=sys.stderr)
        if self.streak < self.max_bad_steps:
            return
        log.write("diverged", step, {"problem": problem, "in_a_row": self.streak})
        log.close()
        if bar is not None:
            bar.close()
        raise TrainingDiverged(
            f"training diverged: {self.streak} steps in a row (steps {step - self.streak + 1} to {step}) had a "
            f"non-finite loss or gradient; at step {step} {problem}. No weight was updated by them and nothing "
            f"was written for them; {saved}. Lower train.lr (now {lr:g}) or raise train.max_bad_steps "
            f"({self.max_bad_steps}).")
