"""Inference beyond one forward: the x8 self-ensemble and tiled inference in bounded memory.

A *forward* here is any callable (B, 3, h, w) float -> (B, 3, h*s, w*s) float:
the network itself, or :func:`self_ensemble` of it. :func:`super_resolve`
composes the two as ``facd upscale`` and ``facd eval`` use them.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..checks import check_int

Forward = Callable[[Tensor], Tensor]

#: Index i of the dihedral group of the square: bit 0 flips W, bit 1 flips H, bit 2 swaps H and W.
ENSEMBLE_SIZE = 8


def dihedral(x: Tensor, index: int) -> Tensor:
    """Transform ``index`` (0..7) of the flips/rotations of the square, on the last two dims of ``x``."""
    if index & 4:
        x = x.transpose(-1, -2)
    dims = [d for bit, d in ((1, -1), (2, -2)) if index & bit]
    return x.flip(dims) if dims else x


def dihedral_inverse(x: Tensor, index: int) -> Tensor:
    """The inverse of :func:`dihedral` ``index``: undo the flips, then the transpose."""
    dims = [d for bit, d in ((1, -1), (2, -2)) if index & bit]
    x = x.flip(dims) if dims else x
    return x.transpose(-1, -2) if index & 4 else x


def self_ensemble(forward: Forward) -> Forward:
    """The x8 self-ensemble of EDSR (Lim et al. 2017), also reported by CSD and DUKD.

    The output is the mean, in float32 or wider, of ``inverse_i(forward(transform_i(x)))``
    over the 8 flips and rotations; ``forward`` runs 8 times on (B, C, h, w)
    (or (B, C, w, h)) inputs, one at a time, so memory stays that of one forward.
    """
    def ensemble_forward(x: Tensor) -> Tensor:
        total = None
        for index in range(ENSEMBLE_SIZE):
            out = dihedral_inverse(forward(dihedral(x, index)), index)
            total = out.to(torch.promote_types(out.dtype, torch.float32)) if total is None else total.add_(out)
        return total / ENSEMBLE_SIZE

    return ensemble_forward


def receptive_radius(network: nn.Module) -> int:
    """LR pixels of context, on each side, that the network's convolutions see for one output pixel.

    Walks the ``Conv2d`` modules in the order they are registered (for EDSR
    and RCAN, ``conv_first``, ``body``, ``conv_after_body``, ``upsample``,
    ``conv_last``: the order of the forward), each at the resolution reached
    by the ``PixelShuffle`` layers registered before it, and sums their
    half-widths along that chain (a residual block's identity path is
    shorter, so the chain through every conv is the longest path). Rounded up.

    This bounds what the convolutions see. A network with global pooling
    (RCAN's channel attention) sees the whole image besides: see
    :func:`has_global_context`.
    """
    radius, resolution = 0.0, 1
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            dilation = max(module.dilation)
            radius += (max(kernel_h, kernel_w) - 1) // 2 * dilation / resolution
        elif isinstance(module, nn.PixelShuffle):
            resolution *= module.upscale_factor
    return math.ceil(radius - 1e-9)


def has_global_context(network: nn.Module) -> bool:
    """Whether an output pixel depends on the whole image (adaptive pooling, as in RCAN's channel attention)."""
    return any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in network.modules())


def _spans(length: int, tile: int, overlap: int) -> Iterator[tuple[slice, slice]]:
    """(input span, core span) pairs covering 0..length: cores of ``tile``, inputs ``overlap`` wider on each side."""
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        yield slice(max(0, start - overlap), min(length, stop + overlap)), slice(start, stop)


def _scaled(span: slice, scale: int, origin: int = 0) -> slice:
    return slice((span.start - origin) * scale, (span.stop - origin) * scale)


def tiled_forward(forward: Forward, lr: Tensor, scale: int, tile: int, overlap: int, batch: int = 1) -> Tensor:
    """``forward(lr)`` computed on tiles, so memory is bounded by the tile size, not the image size.

    Args:
        forward: (N, C, h, w) float -> (N, C_out, h*scale, w*scale) float.
        lr: (B, C, H, W) float.
        tile: core tile side in LR pixels; each tile is run with ``overlap`` more LR
            pixels of context on each side (less at the image border), and only its
            core is kept.
        batch: tiles of the same shape stacked into one forward (each of B images).

    Returns (B, C_out, H*scale, W*scale) in the forward's dtype. When ``overlap`` is at least
    :func:`receptive_radius` and the network has no global context, every kept
    pixel saw exactly the inputs it sees in the whole image, so the result equals
    ``forward(lr)`` up to float rounding: in float64 the outputs quantised to
    8 bits are identical; in float32 the convolutions of a tile and of the whole
    image may sum in another order (oneDNN picks its blocking by shape), so a
    value within about 1e-6 of a rounding boundary can land one level off (1 of
    216,000 values on a 120x150 photo crop with the demo teacher). With a smaller
    overlap the pixels within ``radius - overlap`` LR pixels of a tile's inner
    edge see zero padding where the image has content: seams, fading with the
    distance from the edge.
    """
    tile, overlap = check_int("tile", tile, 1), check_int("tile overlap", overlap, 0)
    batch = check_int("batch", batch, 1)
    if lr.dim() != 4:
        raise ValueError(f"lr must be (B, C, H, W), got shape {tuple(lr.shape)}")
    height, width = lr.shape[-2:]
    groups: dict[tuple[int, int], list[tuple[slice, slice, slice, slice]]] = {}
    for rows, core_rows in _spans(height, tile, overlap):
        for cols, core_cols in _spans(width, tile, overlap):
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            groups.setdefault(shape, []).append((rows, cols, core_rows, core_cols))
    out: Optional[Tensor] = None
    for windows in groups.values():
        for first in range(0, len(windows), batch):
            chunk = windows[first:first + batch]
            crops = torch.cat([lr[:, :, rows, cols] for rows, cols, _, _ in chunk])
            sr = forward(crops)
            if out is None:
                out = sr.new_empty(lr.shape[0], sr.shape[1], height * scale, width * scale)
            for index, (rows, cols, core_rows, core_cols) in enumerate(chunk):
                tile_sr = sr[index * lr.shape[0]:(index + 1) * lr.shape[0]]
                # The core, in HR pixels: where it lies in the image, and where in this tile's output.
                out_rows, out_cols = _scaled(core_rows, scale), _scaled(core_cols, scale)
                in_rows, in_cols = _scaled(core_rows, scale, rows.start), _scaled(core_cols, scale, cols.start)
                out[:, :, out_rows, out_cols] = tile_sr[:, :, in_rows, in_cols]
    return out


@torch.no_grad()
def super_resolve(network: nn.Module, lr: Tensor, *, tile: Optional[int] = None, tile_overlap: Optional[int] = None,
                  ensemble: bool = False, batch: int = 1) -> Tensor:
    """(B, 3, H, W) float LR in [0, 1] -> (B, 3, H*s, W*s) float SR (not clamped), on ``lr``'s device.

    ``tile`` None runs the whole image; otherwise :func:`tiled_forward` with
    ``tile_overlap`` (default :func:`receptive_radius`). ``ensemble`` adds the
    x8 self-ensemble (per tile when tiled).
    """
    forward: Forward = self_ensemble(network) if ensemble else network
    if tile is None:
        return forward(lr)
    overlap = receptive_radius(network) if tile_overlap is None else tile_overlap
    from ..models import network_scale

    return tiled_forward(forward, lr, network_scale(network), tile, overlap, batch)
