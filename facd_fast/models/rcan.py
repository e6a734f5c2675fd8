"""RCAN (Zhang et al. 2018) with BasicSR's parameter names.

body.G.residual_group.B.rcab.{0,2} are an RCAB's convs,
body.G.residual_group.B.rcab.3.attention.{1,3} its channel-attention 1x1 convs,
body.G.conv a group's closing conv.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..checks import check_int, check_real
from .network import DIV2K_RGB_MEAN, ResidualSRNetwork


class ChannelAttention(nn.Module):
    """x * sigmoid(conv(relu(conv(avgpool(x))))), squeezing channels by ``reduction``."""

    def __init__(self, num_feat: int, reduction: int):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(num_feat, num_feat // reduction, 1), nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // reduction, num_feat, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class RCAB(nn.Module):
    """Residual channel-attention block: conv -> ReLU -> conv -> attention, scaled, plus the identity."""

    def __init__(self, num_feat: int, reduction: int, res_scale: float):
        super().__init__()
        self.res_scale = res_scale
        self.rcab = nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(num_feat, num_feat, 3, 1, 1), ChannelAttention(num_feat, reduction))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.rcab(x) * self.res_scale


class ResidualGroup(nn.Module):
    """``num_block`` RCABs and a closing conv, plus the group's identity."""

    def __init__(self, num_feat: int, num_block: int, reduction: int, res_scale: float):
        super().__init__()
        self.residual_group = nn.Sequential(*(RCAB(num_feat, reduction, res_scale) for _ in range(num_block)))
        self.conv = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(self.residual_group(x))


class RCAN(ResidualSRNetwork):
    """RCAN: ``num_group`` residual groups of ``num_block`` RCABs, ``num_feat`` channels.

    Default taps (docs/models.md, "Feature taps"): after group 2, after group 6 (for 10 groups;
    the same fractions 2/10 and 6/10 of the groups otherwise), and ``conv_after_body``.
    """

    arch = "rcan"

    def __init__(self, scale: int = 4, num_feat: int = 64, num_group: int = 10, num_block: int = 20,
                 reduction: int = 16, res_scale: float = 1.0, *, taps=None, num_in_ch: int = 3, num_out_ch: int = 3,
                 img_range: float = 255.0, rgb_mean: Sequence[float] = DIV2K_RGB_MEAN, preset: str | None = None):
        self.num_group = check_int("num_group", num_group, 1)
        self.num_block = check_int("num_block", num_block, 1)
        self.reduction = check_int("reduction", reduction, 1)
        if num_feat // self.reduction < 1:
            raise ValueError(f"reduction must be <= num_feat, got reduction={reduction}, num_feat={num_feat}")
        self.res_scale = check_real("res_scale", res_scale, 0.0, least_inclusive=False)
        super().__init__(scale=scale, num_feat=num_feat, taps=taps, num_in_ch=num_in_ch, num_out_ch=num_out_ch,
                         img_range=img_range, rgb_mean=rgb_mean, preset=preset)

    def make_body(self) -> nn.Sequential:
        return nn.Sequential(*(ResidualGroup(self.num_feat, self.num_block, self.reduction, self.res_scale)
                               for _ in range(self.num_group)))

    def default_taps(self):
        group_ends = sorted({max(1, round(self.num_group * k / 10)) for k in (2, 6)})
        return tuple(end - 1 for end in group_ends) + ("conv_after_body",)

    def body_kwargs(self) -> dict:
        return {"num_group": self.num_group, "num_block": self.num_block, "reduction": self.reduction,
                "res_scale": self.res_scale}
