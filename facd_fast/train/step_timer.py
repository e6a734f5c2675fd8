"""Wall time of the named phases of training steps: what ``facd bench``'s step breakdown reads.

The trainer wraps each phase of a step in ``timer("teacher")``; a disabled
timer (every run's) hands back one shared do-nothing context, so timing costs
nothing unless a benchmark turns it on. On CUDA an enabled timer synchronises
at each phase boundary, so each phase is charged with its own kernels.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import ContextManager, Dict

import torch

_NOTHING = contextlib.nullcontext()


class StepTimer:
    """Accumulates seconds per phase name while ``enabled``; ``timer(name)`` is the context of one phase."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds: Dict[str, float] = defaultdict(float)

    def __call__(self, name: str) -> ContextManager:
        return self._phase(name) if self.enabled else _NOTHING

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _phase(self, name: str):
        self._synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] += time.perf_counter() - started

    def reset(self) -> Dict[str, float]:
        """The seconds recorded so far (and start again from zero)."""
        recorded = dict(self.seconds)
        self.seconds.clear()
        return recorded
