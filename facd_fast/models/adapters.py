"""The DR blocks of FACD: one 1x1 conv per tap, student channels to teacher channels.

They live outside the student network, so an exported student carries none.
"""
from __future__ import annotations

from torch import Tensor, nn

from .network import check_positive_int


class DRAdapters(nn.Module):
    """``adapters[j]``: Conv2d(student_channels, teacher_channels, 1) with bias, for tap j."""

    def __init__(self, student_channels: int, teacher_channels: int, num_taps: int = 3):
        super().__init__()
        self.student_channels = check_positive_int("student_channels", student_channels)
        self.teacher_channels = check_positive_int("teacher_channels", teacher_channels)
        self.num_taps = check_positive_int("num_taps", num_taps)
        self.adapters = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_taps))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: J tensors (B, student_channels, h, w) -> J tensors (B, teacher_channels, h, w)."""
        if len(features) != self.num_taps:
            raise ValueError(f"features must hold one tensor per tap ({self.num_taps}), got {len(features)}")
        for j, feature in enumerate(features):
            if feature.dim() != 4 or feature.shape[1] != self.student_channels:
                raise ValueError(f"features[{j}] must be (B, {self.student_channels}, h, w), "
                                 f"got {tuple(feature.shape)}")
        return [adapter(feature) for adapter, feature in zip(self.adapters, features)]
