"""The FACD loss and adaptive mask in plain PyTorch: the oracle.

A direct transcription of ``docs/loss.md`` ("One tap" and "Adaptive mask"). It is
written to be read, not to be fast: the in-batch negatives materialise a
(B, B, C, H, W) tensor of pairwise differences. Every op kernel is tested
against these functions, and ``backend="reference"`` runs them; what comes
after the distances (ratio, mask, reduction, the mask rule) is shared with
the ops in :mod:`facd_fast.definition`.

No input checking happens here; :mod:`facd_fast.api` validates and then calls
either these functions or the ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .definition import EPS_NORM, compute_dtype, contrastive_ratio, mask_from_mse


def normalize_features(x: Tensor, normalize: str) -> Tensor:
    """phi: x (..., C, H, W) -> each spatial position's C-vector over max(||v||_2, EPS_NORM)."""
    if normalize == "none":
        return x
    norm = torch.linalg.vector_norm(x, dim=-3, keepdim=True)
    return x / norm.clamp_min(EPS_NORM)


def feature_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """d(a, b): mean over the last three dims (C, H, W) of |a - b| or (a - b)^2."""
    diff = a - b
    per_element = diff.abs() if distance == "l1" else diff.square()
    return per_element.mean(dim=(-3, -2, -1))


def feature_distances(
    student: Tensor,
    teacher: Tensor,
    negatives: Optional[Tensor],
    distance: str,
    normalize: str,
) -> Tuple[Tensor, Tensor]:
    """The two per-patch distances every FACD backend computes.

    student, teacher: (B, C, H, W); negatives: (B, K, C, H, W) or None.
    Returns ``(d_pos, d_neg)``, each (B,): d_pos[i] = d(s_i, t_i) and
    d_neg[i] = mean over the negatives N_i of d(s_i, x), where N_i is
    {t_k : k != i} when ``negatives`` is None, else {negatives[i, k]}.
    """
    s = normalize_features(student, normalize)
    t = normalize_features(teacher, normalize)
    d_pos = feature_distance(s, t, distance)
    if negatives is None:
        batch = s.shape[0]
        d_all = feature_distance(s[:, None], t[None, :], distance)  # (B, B): d(s_i, t_k)
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=s.device)
        d_neg = d_all[off_diagonal].view(batch, batch - 1).mean(dim=1)
    else:
        n = normalize_features(negatives, normalize)
        d_neg = feature_distance(s[:, None], n, distance).mean(dim=1)
    return d_pos, d_neg


def drop_masked_students(student: Tensor, mask: Tensor) -> Tensor:
    """student with the masked-out patches' features replaced by zeros.

    A masked-out patch's l_i is dropped and its student feature serves no other
    patch (negatives are teacher features), so the loss does not change; but
    its features are then never read, so a NaN or Inf there cannot reach any
    gradient, and the patch gets exactly 0. (The fused backends get the same
    without the copy: a patch whose upstream gradients are 0 is not read.)
    """
    keep = mask.to(torch.bool).view(-1, *([1] * (student.dim() - 1)))
    return torch.where(keep, student, torch.zeros((), dtype=student.dtype, device=student.device))


def contrastive_loss(
    student: Tensor,
    teacher: Tensor,
    negatives: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    distance: str = "l1",
    normalize: str = "channel",
    eps: float = 1e-6,
    reduction: str = "mean",
) -> Tensor:
    """Feature-domain contrastive loss of one tap (docs/loss.md, "One tap").

    student: (B, C, H, W) float, already passed through DR; teacher: (B, C, H, W);
    negatives: (B, K, C, H, W) or None for in-batch negatives; mask: (B,) of 0/1.
    Half inputs are computed in float32; the result has the input dtype.
    """
    dtype = compute_dtype(student.dtype)
    if mask is not None:
        student = drop_masked_students(student, mask)
    d_pos, d_neg = feature_distances(
        student.to(dtype),
        teacher.to(dtype),
        None if negatives is None else negatives.to(dtype),
        distance,
        normalize,
    )
    return contrastive_ratio(d_pos, d_neg, mask, eps, reduction).to(student.dtype)


def patch_mse(sr_student: Tensor, sr_teacher: Tensor, hr: Tensor) -> Tensor:
    """(B, 2) in ``compute_dtype``: per-patch MSE of the student and the teacher against hr."""
    dtype = compute_dtype(hr.dtype)
    hr = hr.to(dtype)
    mse_student = (sr_student.to(dtype) - hr).square().mean(dim=(1, 2, 3))
    mse_teacher = (sr_teacher.to(dtype) - hr).square().mean(dim=(1, 2, 3))
    return torch.stack((mse_student, mse_teacher), dim=1)


@torch.no_grad()
def adaptive_mask(
    sr_student: Tensor,
    sr_teacher: Tensor,
    hr: Tensor,
    *,
    margin_db: float = 0.0,
    data_range: float = 1.0,
) -> Tensor:
    """Per-patch distillation mask (docs/loss.md, "Adaptive mask"): bool (B,), True where the teacher wins.

    sr_student, sr_teacher, hr: (B, 3, H, W) in [0, data_range] (the PSNR gap
    does not depend on data_range).
    """
    return mask_from_mse(patch_mse(sr_student, sr_teacher, hr), margin_db)
