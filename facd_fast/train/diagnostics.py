"""Per-step diagnostics of the objective: how hard each term pulls on the student, and in which direction.

For each weighted term of the objective (``(1 - alpha) * L1(sr_s, hr)``,
``alpha * L1(sr_s, sr_t)`` and ``lambda * sum_j w_j D_j``) the L2 norm of its
gradient with respect to the student network's weights (its trunk, head and
upsampler; not the DR adapters), and the cosine between each distillation
term's gradient and the pixel term's. A feature term whose gradient is tiny
next to the pixel term's cannot change the student; one that is large and
points away from it (cosine < 0) fights the ground truth. Each norm costs one
extra backward pass, so the trainer computes them on log steps only.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor


def term_gradient_norms(parts: Dict[str, Tensor], params: Sequence[Tensor]) -> Dict[str, float]:
    """``{"grad_<term>": ||d term / d params||, "cos_<term>_pixel": cosine with the pixel term's gradient}``.

    ``parts`` are the weighted terms of one step's loss, still in the autograd
    graph (:class:`facd_fast.train.objective.DistillationObjective` with
    ``return_parts=True``); the graph is kept for the step's own backward.
    """
    params = [p for p in params if p.requires_grad]
    flat: Dict[str, Tensor] = {}
    for name, term in parts.items():
        if not term.requires_grad:  # e.g. lambda = 0: the term is a constant
            flat[name] = torch.zeros(sum(p.numel() for p in params), device=term.device)
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                for g, p in zip(grads, params)])
    values = {f"grad_{name}": float(vector.norm()) for name, vector in flat.items()}
    if "pixel" in flat:
        pixel = flat["pixel"]
        for name, vector in flat.items():
            if name != "pixel":
                denominator = float(vector.norm() * pixel.norm())
                values[f"cos_{name}_pixel"] = float(vector @ pixel) / denominator if denominator > 0 else 0.0
    return values
