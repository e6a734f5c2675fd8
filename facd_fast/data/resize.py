"""MATLAB-compatible bicubic resize (``imresize(x, scale)`` with its default 'bicubic' and antialiasing).

MATLAB's algorithm, as used to make the LR images of DIV2K and the SR
benchmark sets: output length ceil(scale * in); output pixel k (1-based) is
centred at u = k / scale + (1 - 1 / scale) / 2 in input coordinates; the
cubic kernel of Keys with a = -0.5, widened by 1 / scale and scaled by
``scale`` when downscaling (antialiasing); weights normalised to sum 1;
input indices outside 1..in mirrored symmetrically (edge pixel repeated).
Each axis is one (out, in) weight matrix, so the resize is two matmuls.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

KERNEL_WIDTH = 4.0


def cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = x.abs()
    near = (1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
    far = (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def output_length(in_length: int, scale: float) -> int:
    # The tolerance keeps e.g. 96 * (1/3) at 32 when the product lands a hair above an integer.
    return max(1, math.ceil(in_length * scale - 1e-9))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> Tensor:
    """(out_length, in_length) float64 CPU matrix W with resized = W @ signal along one axis."""
    widen = scale < 1 and antialiasing
    kernel_width = KERNEL_WIDTH / scale if widen else KERNEL_WIDTH
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)  # 1-based input positions
    distance = u[:, None] - indices
    weights = scale * cubic(distance * scale) if widen else cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Symmetric padding: position i maps to mirror[(i - 1) mod 2n] (0-based), which repeats the edge pixel.
    mirror = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    source = mirror[torch.remainder(indices.long() - 1, 2 * in_length)]
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, source, weights)
    return matrix


def imresize(x: Tensor, scale: float, *, antialiasing: bool = True) -> Tensor:
    """MATLAB ``imresize(x, scale)`` (bicubic) of x (B, C, H, W) float.

    Returns (B, C, ceil(H * scale), ceil(W * scale)) in x's dtype, not
    clamped or rounded; computed in float64. ``scale=1/4`` makes x4 LR images.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, C, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number (e.g. 0.25 to downscale by 4), got {scale!r}")
    scale = float(scale)
    height, width = x.shape[-2:]
    rows = resize_matrix(height, output_length(height, scale), scale, antialiasing).to(x.device)
    cols = resize_matrix(width, output_length(width, scale), scale, antialiasing).to(x.device)
    return (rows @ x.to(torch.float64) @ cols.T).to(x.dtype)
