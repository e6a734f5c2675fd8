"""The feature-distillation terms of the baselines (docs/loss.md, "The training objective"), beside FACD's :class:`facd_fast.FACDLoss`.

Every term takes one tap's student and teacher features and returns the
per-patch loss (B,) in float32 (float64 for float64 features), so that the
adaptive mask can gate patches the same way for every method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def feature_distance(student: Tensor, teacher: Tensor, distance: str, normalize: str = "channel") -> Tensor:
    """FitNet-style FD: mean over C*H*W of |phi(s) - phi(t)| ("l1") or (phi(s) - phi(t))^2 ("l2").

    phi is FACD's feature normalisation (docs/loss.md, "One tap"): "channel" divides
    each position's C-vector by max(||v||_2, 1e-6), "none" is the identity
    (raw FitNet). With "channel", FD is exactly FACD's positive distance
    d_pos without the contrastive denominator, so FD vs FACD isolates the
    contrastive part; raw EDSR features live on a 0..255 scale, where FD
    would need a much smaller lambda.

    Args:
        student: (B, C, H, W) float, the student's feature after its DR adapter.
        teacher: (B, C, H, W), same shape.
    Returns:
        (B,) float32 (float64 for float64 inputs).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    dtype = _accumulation_dtype(student)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if normalize == "channel":
        student, teacher = F.normalize(student, dim=1, eps=1e-6), F.normalize(teacher, dim=1, eps=1e-6)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'channel' or 'none', got {normalize!r}")
    difference = student - teacher
    if distance == "l1":
        per_element = difference.abs()
    elif distance == "l2":
        per_element = difference.square()
    else:
        raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
    return per_element.flatten(1).mean(dim=1)


def spatial_affinity(features: Tensor) -> Tensor:
    """FAKD's spatial affinity matrix: cosine similarity between every pair of positions.

    Args:
        features: (B, C, H, W) float.
    Returns:
        (B, H*W, H*W) in float32 (float64 for float64 inputs); entry (p, q) is
        <f_p, f_q> / (|f_p| |f_q|), the C-vectors at positions p and q
        normalised over channels (He et al., "FAKD: Feature-affinity based
        knowledge distillation for efficient image super-resolution", ICIP 2020).
    """
    flat = F.normalize(features.to(_accumulation_dtype(features)).flatten(2), dim=1, eps=1e-6)  # (B, C, N)
    return flat.transpose(1, 2) @ flat


def affinity_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """FAKD's term: mean |A(s) - A(t)| over the affinity matrices, (B,).

    The student's channel count may differ from the teacher's (affinities are
    (H*W, H*W) either way), so FAKD needs no DR adapter; the spatial sizes must match.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"student and teacher features must share batch and spatial size, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    return (spatial_affinity(student) - spatial_affinity(teacher)).abs().flatten(1).mean(dim=1)


def per_patch_l1(sr: Tensor, target: Tensor) -> Tensor:
    """Mean |sr - target| per patch: (B, 3, H, W) -> (B,) float32 (float64 for float64)."""
    dtype = _accumulation_dtype(sr)
    return (sr.to(dtype) - target.to(dtype)).abs().flatten(1).mean(dim=1)
