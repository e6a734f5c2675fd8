"""``FACDLoss``: the weighted FACD term over all taps, with its adaptive mask."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import api
from .checks import check_choice, check_real
from .definition import mask_from_mse, psnr_gap


class FACDLoss(nn.Module):
    """sum_j w_j * contrastive_loss(student_j, teacher_j, mask=m), with m the adaptive mask.

    Every argument is checked here, when the module is built (TypeError for a
    wrong type, a tensor or a bool where a number belongs; ValueError for a
    value out of range), not at the first call.

    Args:
        tap_weights: w_j, finite numbers >= 0, one per tap (default three taps of weight 1).
        use_mask: gate every patch by :func:`facd_fast.adaptive_mask` (True)
            or distil on all patches (False, the "facd-nomask" ablation).
        margin_db: the teacher's PSNR lead, in dB, for a patch to be distilled.
        distance, normalize, eps, backend: passed to :func:`facd_fast.contrastive_loss`.
        data_range: the images' peak value.

    Call with lists of per-tap student features (after DR) and teacher
    features, each (B, C_j, H_j, W_j) (e.g. :meth:`facd_fast.FeatureTaps.features`
    of the two networks), and the images sr_student,
    sr_teacher, hr, each (B, 3, H, W). Returns ``(loss, diagnostics)``:
    loss is a scalar in the features' dtype; diagnostics holds detached
    tensors: ``tap_losses`` (J,), ``mask`` (B,) bool, ``distilled_fraction``
    (share of patches distilled) and ``psnr_gap_db`` (mean PSNR of the
    teacher minus the student over the batch; +inf if the teacher is exact
    on a patch the student is not).
    """

    def __init__(
        self,
        tap_weights: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        use_mask: bool = True,
        margin_db: float = 0.0,
        distance: str = "l1",
        normalize: str = "channel",
        eps: float = 1e-6,
        data_range: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(tap_weights, (str, bytes, Tensor)) or not isinstance(tap_weights, Sequence):
            raise TypeError(f"tap_weights must be a sequence of numbers (a list or tuple), got {type(tap_weights).__name__}")
        if not tap_weights:
            raise ValueError("tap_weights must name at least one tap, got an empty sequence")
        for index, weight in enumerate(tap_weights):
            check_real(f"tap_weights[{index}]", weight, 0.0)
        if not isinstance(use_mask, bool):
            raise TypeError(f"use_mask must be True or False, got {type(use_mask).__name__} {use_mask!r}")
        check_real("margin_db", margin_db)
        check_choice("distance", distance, api.DISTANCES)
        check_choice("normalize", normalize, api.NORMALIZATIONS)
        check_real("eps", eps, 0.0, least_inclusive=False)
        check_real("data_range", data_range, 0.0, least_inclusive=False)
        api._check_backend(backend)
        self.tap_weights: Tuple[float, ...] = tuple(float(w) for w in tap_weights)
        self.use_mask = use_mask
        self.margin_db = float(margin_db)
        self.distance = distance
        self.normalize = normalize
        self.eps = eps
        self.data_range = data_range
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"tap_weights={self.tap_weights}, use_mask={self.use_mask}, margin_db={self.margin_db}, "
            f"distance={self.distance!r}, normalize={self.normalize!r}"
        )

    def tap_losses(
        self,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        mask: Optional[Tensor] = None,
        negatives: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> List[Tensor]:
        """The contrastive loss of each tap under ``mask`` ((B,) bool or None: every patch), unweighted."""
        taps = len(self.tap_weights)
        if len(student_features) != taps or len(teacher_features) != taps:
            raise ValueError(
                f"student_features and teacher_features must hold {taps} taps (one per tap weight), "
                f"got {len(student_features)} and {len(teacher_features)}"
            )
        if negatives is not None and len(negatives) != taps:
            raise ValueError(f"negatives must hold {taps} entries (None for in-batch), got {len(negatives)}")
        return [
            api.contrastive_loss(
                s, t, None if negatives is None else negatives[j], mask=mask,
                distance=self.distance, normalize=self.normalize, eps=self.eps,
                reduction="mean", backend=self.backend,
            )
            for j, (s, t) in enumerate(zip(student_features, teacher_features))
        ]

    def weighted_sum(
        self,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        mask: Optional[Tensor] = None,
        negatives: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tensor:
        """sum_j w_j * contrastive_loss(student_j, teacher_j, mask=mask), for a mask computed elsewhere (or None)."""
        return self._weighted(self.tap_losses(student_features, teacher_features, mask, negatives))

    def _weighted(self, tap_losses: List[Tensor]) -> Tensor:
        return sum(w * l for w, l in zip(self.tap_weights, tap_losses))

    def forward(
        self,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        sr_student: Tensor,
        sr_teacher: Tensor,
        hr: Tensor,
        negatives: Optional[Sequence[Optional[Tensor]]] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        with torch.no_grad():
            mse = api.patch_mse(sr_student.detach(), sr_teacher, hr, backend=self.backend)
            mask = mask_from_mse(mse, self.margin_db)
        tap_losses = self.tap_losses(student_features, teacher_features, mask if self.use_mask else None, negatives)
        diagnostics = {
            "tap_losses": torch.stack([l.detach().float() for l in tap_losses]),
            "mask": mask,
            "distilled_fraction": mask.float().mean(),
            "psnr_gap_db": psnr_gap(mse).mean(),
        }
        return self._weighted(tap_losses), diagnostics
