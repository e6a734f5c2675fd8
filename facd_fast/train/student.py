"""The student as the optimiser sees it: the network, its feature taps and, for the adapted terms, its DR adapters."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from ..taps import FeatureTaps


class StudentWithAdapters(nn.Module):
    """The trained network plus its DR adapters: what DDP wraps, ``torch.compile`` compiles and the optimiser updates.

    Args:
        student: the bare SR network being trained (what is validated and exported).
        taps: the student's :class:`facd_fast.FeatureTaps`, or None when no term reads features.
        adapters: its DR adapters (:class:`facd_fast.models.DRAdapters`), or None.

    forward(lr (B, 3, h, w)) -> (sr, features, adapted): the tap features (None
    without taps) and the same through DR (None without adapters).
    """

    def __init__(self, student: nn.Module, taps: Optional[FeatureTaps], adapters: Optional[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters
        self.taps = taps

    def forward(self, lr: Tensor) -> Tuple[Tensor, Optional[List[Tensor]], Optional[List[Tensor]]]:
        sr = self.student(lr)
        if self.taps is None:
            return sr, None, None
        features = self.taps.features()
        return sr, features, None if self.adapters is None else self.adapters(features)
