"""The training objective of spec section 5 and its baselines, in one module.

L = (1 - alpha) * L1(sr_s, hr) + alpha * mean_i(m_i * L1_i(sr_s, sr_t)) + lambda * sum_j w_j * D_j

with D_j the feature term of the method: FACD (contrastive, :class:`facd_fast.FACDLoss`),
FitNet-style FD (L1 or L2 between DR(s_j) and t_j, after the same
feature normalisation as FACD) or FAKD (L1 between spatial
affinity matrices). m is the adaptive mask when the method uses it, else 1.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import api
from ..module import FACDLoss
from .config import METHOD_TERMS, method_distance
from .feature_losses import affinity_distance, feature_distance, per_patch_l1

#: Methods whose feature term compares DR-adapted student features with the teacher's.
ADAPTED_METHODS = tuple(method for method, (term, _) in METHOD_TERMS.items() if term in ("fd", "facd"))


def mask_enabled(method: str, use_mask) -> bool:
    """Resolve ``distill.use_mask`` ("auto", True, False) for ``method``."""
    if method in ("none", "facd-nomask"):
        return False
    if use_mask == "auto":
        return method == "facd"
    return bool(use_mask)


class DistillationObjective(nn.Module):
    """The loss of one training step.

    Args:
        method: one of :data:`facd_fast.train.config.METHODS`.
        alpha, feature_weight: alpha and lambda of the objective (ignored, i.e. 0, for "none").
        tap_weights: w_j, one per tap.
        use_mask: gate both distillation terms per patch by the adaptive mask.
        margin_db, normalize, backend: FACD's options (spec sections 3-4); normalize applies to FD too.
        distance: ``distill.distance`` ("auto", "l1", "l2"), resolved by
            :func:`facd_fast.train.config.method_distance` (fd-l1/fd-l2 fix theirs).

    forward(sr_student, student_features, sr_teacher, teacher_features, hr):
        sr_*, hr: (B, 3, H, W) float; features: lists of (B, C_j, h, w), the
        student's already through DR for the adapted methods; the teacher
        arguments may be None for "none". Returns ``(loss, terms)``, loss a
        float32 scalar and terms detached float32 scalars for the log.
    """

    def __init__(
        self,
        method: str,
        *,
        alpha: float = 0.5,
        feature_weight: float = 1.0,
        tap_weights: Sequence[float] = (1.0, 1.0, 1.0),
        use_mask: bool = True,
        margin_db: float = 0.0,
        distance: str = "auto",
        normalize: str = "channel",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if feature_weight < 0:
            raise ValueError(f"distill.lambda must be >= 0, got {feature_weight}")
        self.method = method
        self.distance = method_distance(method, distance)  # raises for an unknown method or a contradiction
        self.feature_term = METHOD_TERMS[method][0]
        self.alpha = 0.0 if method == "none" else float(alpha)
        self.feature_weight = 0.0 if method == "none" else float(feature_weight)
        self.tap_weights = tuple(float(w) for w in tap_weights)
        self.use_mask = use_mask
        self.margin_db = margin_db
        self.backend = backend
        self.normalize = normalize
        self.facd = (
            FACDLoss(
                self.tap_weights, use_mask=use_mask, margin_db=margin_db,
                distance=self.distance, normalize=normalize, backend=backend,
            )
            if self.feature_term == "facd"
            else None
        )

    @property
    def needs_teacher(self) -> bool:
        return self.method != "none"

    def _mask(self, sr_student: Tensor, sr_teacher: Tensor, hr: Tensor) -> Optional[Tensor]:
        if not self.use_mask:
            return None
        return api.adaptive_mask(sr_student.detach(), sr_teacher, hr, margin_db=self.margin_db, backend=self.backend)

    def _baseline_feature_term(self, student: List[Tensor], teacher: List[Tensor], mask: Optional[Tensor]) -> Tensor:
        total = 0.0
        for weight, s, t in zip(self.tap_weights, student, teacher):
            if self.feature_term == "fakd":
                per_patch = affinity_distance(s, t)
            else:
                per_patch = feature_distance(s, t, self.distance, self.normalize)
            total = total + weight * _masked_mean(per_patch, mask)
        return total

    def forward(
        self,
        sr_student: Tensor,
        student_features: Optional[List[Tensor]],
        sr_teacher: Optional[Tensor],
        teacher_features: Optional[List[Tensor]],
        hr: Tensor,
        *,
        return_parts: bool = False,
    ):
        """``(loss, terms)``, or ``(loss, terms, parts)`` with ``return_parts``: parts are the weighted
        terms of the sum, still in the graph ({"pixel", "output", "feature"}), for gradient diagnostics."""
        sr_student = sr_student.float()
        hr = hr.float()
        pixel = F.l1_loss(sr_student, hr)
        if not self.needs_teacher:
            terms = {"loss": pixel.detach(), "l1_hr": pixel.detach()}
            return (pixel, terms, {"pixel": pixel}) if return_parts else (pixel, terms)
        if len(student_features) != len(self.tap_weights) or len(teacher_features) != len(self.tap_weights):
            raise ValueError(
                f"distill.tap_weights has {len(self.tap_weights)} weights but the models give "
                f"{len(student_features)} student and {len(teacher_features)} teacher taps"
            )
        sr_teacher = sr_teacher.float()
        teacher_features = [t.to(s.dtype) for s, t in zip(student_features, teacher_features)]
        terms: Dict[str, Tensor] = {}
        if self.facd is not None:
            feature_term, diagnostics = self.facd(student_features, teacher_features, sr_student, sr_teacher, hr)
            mask = diagnostics["mask"] if self.use_mask else None
            terms["psnr_gap_db"] = diagnostics["psnr_gap_db"].float()
        else:
            mask = self._mask(sr_student, sr_teacher, hr)
            feature_term = self._baseline_feature_term(student_features, teacher_features, mask)
        output_term = _masked_mean(per_patch_l1(sr_student, sr_teacher), mask)
        parts = {
            "pixel": (1.0 - self.alpha) * pixel,
            "output": self.alpha * output_term,
            "feature": self.feature_weight * feature_term.float(),
        }
        loss = parts["pixel"] + parts["output"] + parts["feature"]
        terms.update(
            loss=loss.detach(),
            l1_hr=pixel.detach(),
            l1_teacher=output_term.detach(),
            feature=feature_term.detach().float(),
            distilled_fraction=(mask.float().mean() if mask is not None else torch.ones((), device=hr.device)),
        )
        return (loss, terms, parts) if return_parts else (loss, terms)


def _masked_mean(per_patch: Tensor, mask: Optional[Tensor]) -> Tensor:
    """sum_i m_i * x_i / B (the FACD reduction), or the plain mean without a mask."""
    if mask is None:
        return per_patch.mean()
    return (per_patch * mask.to(per_patch.dtype)).sum() / per_patch.shape[0]
