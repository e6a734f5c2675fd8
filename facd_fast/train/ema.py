"""Exponential moving average of a model's weights."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after every optimiser step.

    Args:
        model: the trained model (its parameters and float buffers are tracked).
        decay: in (0, 1); 0.999 averages over roughly the last 1000 steps.

    ``shadow`` is a frozen copy of ``model`` in eval mode, the model to validate and export.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        for module in self.shadow.modules():  # the copy must not feed the trained model's feature taps
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        shadows = [*self.shadow.parameters(), *self.shadow.buffers()]
        currents = [*model.parameters(), *model.buffers()]
        floating = [(s, c.detach()) for s, c in zip(shadows, currents) if s.is_floating_point()]
        if floating:
            torch._foreach_lerp_([s for s, _ in floating], [c for _, c in floating], 1.0 - self.decay)
        for shadow, current in zip(shadows, currents):
            if not shadow.is_floating_point():
                shadow.copy_(current)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state)
