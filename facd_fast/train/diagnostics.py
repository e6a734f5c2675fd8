"""Per-step diagnostics of the objective: how hard each term pulls on the student, and in which direction.

For each weighted term of the objective (``(1 - alpha) * L1(sr_s, hr)``,
``alpha * L1(sr_s, sr_t)`` and ``lambda * sum_j w_j D_j``) the L2 norm of its
gradient with respect to the student network's weights (its trunk, head and
upsampler; not the DR adapters), and the cosine between each distillation
term's gradient and the pixel term's. A feature term whose gradient is tiny
next to the pixel term's cannot change the student; one that is large and
points away from it (cosine < 0) fights the ground truth. Each norm costs one
extra backward pass (but the one the step's own backward gives), so the trainer
computes them on log steps only.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor


def term_gradient_norms(parts: Dict[str, Tensor], params: Sequence[Tensor],
                        total: Optional[Sequence[Optional[Tensor]]] = None) -> Dict[str, float]:
    """``{"grad_<term>": ||d term / d params||, "cos_<term>_pixel": cosine with the pixel term's gradient}``.

    ``parts`` are the weighted terms of one step's loss, still in the autograd
    graph (:class:`facd_fast.train.objective.DistillationObjective` with
    ``return_parts=True``); ``params`` the parameters (requiring grad) to
    differentiate by. ``total``: the gradient of the parts' sum, when its
    backward has run with ``retain_graph`` (``p.grad`` of each of ``params``):
    the first part's gradient is then the total minus the others', one
    backward pass fewer (none at all for a loss of one part).
    """
    if total is not None and len(total) != len(params):
        raise ValueError(f"total must hold one gradient per parameter ({len(params)}), got {len(total)}")

    def flat(gradients) -> Tensor:
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(gradients, params)])

    names = list(parts)
    vectors: Dict[str, Tensor] = {}
    for name in names[1:] if total is not None else names:
        term = parts[name]
        if not term.requires_grad:  # e.g. lambda = 0: the term is a constant
            vectors[name] = torch.zeros(sum(p.numel() for p in params), device=term.device)
            continue
        vectors[name] = flat(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
    if total is not None and names:
        vectors[names[0]] = flat(total) - sum(vectors[name] for name in names[1:])
    values = {f"grad_{name}": float(vectors[name].norm()) for name in names}
    if "pixel" in vectors:
        pixel = vectors["pixel"]
        for name in names:
            if name != "pixel":
                denominator = float(vectors[name].norm() * pixel.norm())
                values[f"cos_{name}_pixel"] = float(vectors[name] @ pixel) / denominator if denominator > 0 else 0.0
    return values
