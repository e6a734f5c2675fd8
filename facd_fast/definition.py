"""What every FACD path shares: compute dtype, the norm floor, the O(B) ratio, mask and reduction, the mask rule.

The definition (docs/loss.md, "One tap" and "Adaptive mask") split where the
work splits: the per-patch distances and errors come from an op kernel
(:mod:`facd_fast.ops`) or from the oracle (:mod:`facd_fast.reference`); what
follows them, O(B) work on (B,) vectors, is written once here and used by
both, as are the constants the kernels share.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

#: Floor of the per-position channel norm in ``normalize="channel"`` (csrc/facd_cpu.h has it as kEpsNorm).
EPS_NORM = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype FACD accumulates in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sign_state_dtype(batch: int) -> torch.dtype:
    """Integer dtype of the fused l1 kernels' saved per-element sign sums (|sum| <= B - 1): int8 up to B = 128."""
    return torch.int8 if batch <= 128 else torch.int16


def keeps_sign_state(negatives: Optional[Tensor], distance: str) -> bool:
    """Whether the fused forward can keep sign sums for a one-pass student backward: l1, in-batch negatives."""
    return negatives is None and distance == "l1"


def contrastive_ratio(
    d_pos: Tensor,
    d_neg: Tensor,
    mask: Optional[Tensor],
    eps: float,
    reduction: str,
) -> Tensor:
    """l_i = d_pos_i / (d_neg_i + eps), masked by m_i and reduced.

    d_pos, d_neg: (B,); mask: (B,) of 0/1 or None. ``mean`` is
    sum_i m_i l_i / B (masked patches still count in B), ``sum`` is
    sum_i m_i l_i, ``none`` is the (B,) vector m_i l_i.
    """
    if mask is not None:
        # where(), not a product, and before the division: a NaN on a masked patch is dropped, and the
        # patch's distances get exactly 0 as gradient (0 / NaN would be NaN after the division).
        keep = mask.to(torch.bool)
        d_pos = torch.where(keep, d_pos, torch.zeros_like(d_pos))
        d_neg = torch.where(keep, d_neg, torch.zeros_like(d_neg))
    per_patch = d_pos / (d_neg + eps)
    if reduction == "none":
        return per_patch
    total = per_patch.sum()
    return total / per_patch.shape[0] if reduction == "mean" else total


def psnr_gap(mse: Tensor) -> Tensor:
    """(B,) PSNR(teacher) - PSNR(student) in dB, from a (B, 2) per-patch MSE (student, teacher).

    10 log10(mse_student / mse_teacher): the peak value cancels. +inf where
    the teacher is exact and the student is not, NaN where both are exact.
    """
    return 10.0 * torch.log10(mse[:, 0]) - 10.0 * torch.log10(mse[:, 1])


def mask_from_mse(mse: Tensor, margin_db: float) -> Tensor:
    """The adaptive mask (docs/loss.md, "Adaptive mask"): bool (B,), PSNR(teacher) - PSNR(student) > margin_db.

    mse: (B, 2), the student's and the teacher's per-patch MSE. A perfect
    teacher on an imperfect student teaches; two perfect outputs do not
    (NaN > margin is False); a perfect student is not taught.
    """
    return psnr_gap(mse) > margin_db
