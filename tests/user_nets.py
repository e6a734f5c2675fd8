"""Networks defined outside facd_fast, as a user brings them: their own module names, no taps of ours.

``build_plain`` is a small efficient-SR-style student (a trunk of conv blocks, a pixel-shuffle tail);
``build_wide_tail`` taps at the HR resolution (for the spatial-mismatch error).
"""
from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.mix = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(self.act(self.conv(x)))


class PlainSR(nn.Module):
    """head -> stages.{0..depth-1} -> fuse (+ head) -> tail (conv + PixelShuffle), plus a nearest-neighbour skip."""

    def __init__(self, scale: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.stages = nn.ModuleList(Block(width) for _ in range(depth))
        self.fuse = nn.Conv2d(width, width, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(width, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        self.skip = nn.Upsample(scale_factor=scale, mode="nearest")

    def forward(self, x: Tensor) -> Tensor:
        shallow = h = self.head(x)
        for stage in self.stages:
            h = stage(h)
        return self.tail(self.fuse(h) + shallow) + self.skip(x)


def build_plain(scale: int, width: int = 16, depth: int = 3) -> PlainSR:
    return PlainSR(scale, width, depth)


def build_wide_tail(scale: int) -> PlainSR:
    return PlainSR(scale, width=8, depth=2)


def not_a_network(scale: int):
    return "not a module"
