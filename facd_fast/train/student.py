"""The student as the optimiser sees it: the network plus, for the adapted methods, its DR adapters."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn


class StudentWithAdapters(nn.Module):
    """The trained network plus, for the adapted methods, its DR adapters: what DDP wraps and the optimiser updates.

    Args:
        student: the bare SR network being trained (what is validated and exported).
        adapters: its DR adapters (:class:`facd_fast.models.DRAdapters`), or None.
        with_features: return the tap features (False when no feature term is trained).

    forward(lr (B, 3, h, w)) -> (sr, features): features are the tap features
    (through DR when there are adapters), or None when no feature term is trained.
    """

    def __init__(self, student: nn.Module, adapters: Optional[nn.Module], with_features: bool) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters
        self.with_features = with_features

    def forward(self, lr: Tensor) -> Tuple[Tensor, Optional[List[Tensor]]]:
        if not self.with_features:
            return self.student(lr), None
        sr, features = self.student(lr, return_features=True)
        if self.adapters is not None:
            features = self.adapters(features)
        return sr, features
