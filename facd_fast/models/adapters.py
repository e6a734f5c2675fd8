"""The DR blocks of FACD: one 1x1 conv per tap, student channels to teacher channels.

They live outside the student network, so an exported student carries none.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import Tensor, nn

from ..checks import check_int

Channels = Union[int, Sequence[int]]


def _per_tap(name: str, channels: Channels, num_taps: int) -> tuple:
    if isinstance(channels, Sequence) and not isinstance(channels, (str, bytes)):
        if len(channels) != num_taps:
            raise ValueError(f"{name} must give one channel count per tap ({num_taps}), got {list(channels)}")
        return tuple(check_int(f"{name}[{j}]", c, 1) for j, c in enumerate(channels))
    return (check_int(name, channels, 1),) * num_taps


class DRAdapters(nn.Module):
    """``adapters[j]``: Conv2d(student_channels[j], teacher_channels[j], 1) with bias, for tap j.

    ``student_channels`` and ``teacher_channels`` are one count for every tap
    or a count per tap (networks whose taps differ in width).
    """

    def __init__(self, student_channels: Channels, teacher_channels: Channels, num_taps: int = 3):
        super().__init__()
        self.num_taps = check_int("num_taps", num_taps, 1)
        self.student_channels = _per_tap("student_channels", student_channels, self.num_taps)
        self.teacher_channels = _per_tap("teacher_channels", teacher_channels, self.num_taps)
        self.adapters = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(self.student_channels, self.teacher_channels))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: J tensors (B, student_channels[j], h, w) -> J tensors (B, teacher_channels[j], h, w)."""
        if len(features) != self.num_taps:
            raise ValueError(f"features must hold one tensor per tap ({self.num_taps}), got {len(features)}")
        for j, (feature, channels) in enumerate(zip(features, self.student_channels)):
            if feature.dim() != 4 or feature.shape[1] != channels:
                raise ValueError(f"features[{j}] must be (B, {channels}, h, w), got {tuple(feature.shape)}")
        return [adapter(feature) for adapter, feature in zip(self.adapters, features)]
