"""EDSR (Lim et al. 2017) with BasicSR's parameter names: body.N.conv1/conv2."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..checks import check_int, check_real
from .network import DIV2K_RGB_MEAN, ResidualSRNetwork


class ResidualBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, scaled by ``res_scale``, plus the identity (no batch norm)."""

    def __init__(self, num_feat: int, res_scale: float):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale


class EDSR(ResidualSRNetwork):
    """EDSR: ``num_block`` residual blocks of ``num_feat`` channels.

    Default taps (docs/models.md, "Feature taps"): the body split in three runs of
    round(num_block / 3) blocks: after run 1, after run 2, and ``conv_after_body``.
    """

    arch = "edsr"

    def __init__(self, scale: int = 4, num_feat: int = 64, num_block: int = 16, res_scale: float = 1.0, *,
                 taps=None, num_in_ch: int = 3, num_out_ch: int = 3, img_range: float = 255.0,
                 rgb_mean: Sequence[float] = DIV2K_RGB_MEAN, preset: str | None = None):
        self.num_block = check_int("num_block", num_block, 1)
        self.res_scale = check_real("res_scale", res_scale, 0.0, least_inclusive=False)
        super().__init__(scale=scale, num_feat=num_feat, taps=taps, num_in_ch=num_in_ch, num_out_ch=num_out_ch,
                         img_range=img_range, rgb_mean=rgb_mean, preset=preset)

    def make_body(self) -> nn.Sequential:
        return nn.Sequential(*(ResidualBlock(self.num_feat, self.res_scale) for _ in range(self.num_block)))

    def default_taps(self):
        run_ends = sorted({max(1, round(self.num_block * k / 3)) for k in (1, 2)})
        return tuple(end - 1 for end in run_ends) + ("conv_after_body",)

    def body_kwargs(self) -> dict:
        return {"num_block": self.num_block, "res_scale": self.res_scale}
