"""Launch geometry of the feature-distance kernels: their block sizes, and the work split into spans.

A pair kernel's program holds a (BLOCK_A, BLOCK_K, BLOCK_P) tile of anchor
rows, other rows and positions in registers; a kernel that reduces over
channels, a (BLOCK_C, BLOCK_P) one; an l2 closed-form kernel, every row of
BLOCK_P positions. A span (a block of positions times a run of channels) is
what one program covers: see :mod:`facd_fast.kernels.feature_rows`.
"""
from __future__ import annotations

import torch
import triton

from .utils import split_evenly, target_programs

#: Most elements of the (BLOCK_A, BLOCK_K, BLOCK_P) pair tile one program holds in registers.
_PAIR_TILE_ELEMENTS = 8192
#: Largest anchor and other-row blocks.
_MAX_ROW_BLOCK = 16
_MAX_POSITION_BLOCK = 256
#: Elements of the (BLOCK_C, BLOCK_P) tile of the kernels that reduce over channels.
_CHANNEL_TILE_ELEMENTS = 2048
_MAX_CHANNEL_BLOCK = 32


def _pair_blocks(n_anchor_rows: int, n_others: int, n_positions: int, shared_others: bool, dtype: torch.dtype) -> dict:
    """Block sizes of a pair tile: as many positions as fit ``_PAIR_TILE_ELEMENTS`` registers.

    Anchors come in blocks only when they share their other rows (in-batch);
    each explicit-negatives anchor has rows of its own, so its block is 1.
    """
    block_a = min(triton.next_power_of_2(n_anchor_rows), _MAX_ROW_BLOCK) if shared_others else 1
    block_k = min(triton.next_power_of_2(n_others), _MAX_ROW_BLOCK)
    tile = _PAIR_TILE_ELEMENTS // (2 if dtype == torch.float64 else 1)
    block_p = min(triton.next_power_of_2(n_positions), _MAX_POSITION_BLOCK, max(16, tile // (block_a * block_k)))
    return dict(BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_P=block_p)


def _spans(n_channels: int, n_position_blocks: int, n_row_blocks: int, device: torch.device):
    """Work split of a pair kernel: ``(n_spans, channels_per_span)``, a span being a position block times a channel run.

    The channels are cut into as many runs as it takes for the grid to fill the device.
    """
    n_runs, channels_per_span = split_evenly(
        n_channels, triton.cdiv(target_programs(device), n_position_blocks * n_row_blocks)
    )
    return n_position_blocks * n_runs, channels_per_span


def _channel_blocks(n_channels: int, n_positions: int) -> dict:
    """Block sizes of a (channels, positions) tile: all channels up to a cap, positions to fill the tile."""
    block_c = min(triton.next_power_of_2(n_channels), _MAX_CHANNEL_BLOCK)
    block_p = min(triton.next_power_of_2(n_positions), _CHANNEL_TILE_ELEMENTS // block_c)
    return dict(BLOCK_C=block_c, BLOCK_P=block_p)


def _in_batch_blocks(batch: int, n_positions: int, dtype: torch.dtype) -> dict:
    """Block sizes of the l2 closed-form kernels' (all rows, positions) tile: a channel tile's worth of elements,
    as several such tiles (student, teacher, their gradients) are live at once."""
    block_b = triton.next_power_of_2(batch)
    tile = _CHANNEL_TILE_ELEMENTS // (2 if dtype == torch.float64 else 1)
    return dict(BLOCK_B=block_b, BLOCK_P=min(triton.next_power_of_2(n_positions), _MAX_POSITION_BLOCK,
                                             max(16, tile // block_b)))
