"""Feature rows in Triton: the pair kernels' tiles, and the channel normalisation forward and backward.

A row is one patch's (C, H, W) feature; (outer, inner, C, H, W) tensors are
rows too (a (B, C, H, W) feature has inner = 1). The jit helpers here address
and load tiles of rows for the kernels of :mod:`facd_fast.kernels.pairs` and
:mod:`facd_fast.kernels.l2_in_batch`; the two kernels take every position's
C-vector to its inverse norm, and a gradient back through the normalisation.

Tiles. A program owns a block of anchor rows, a block of BLOCK_P spatial
positions and a run of channels (a *span*); it computes the positions'
addresses and loads their inverse norms once, then loops over its channels,
loading one (rows, BLOCK_P) slice of each operand per channel. The channels
are cut into as many runs as it takes for the grid to fill the GPU
(:mod:`facd_fast.kernels.tiling`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _norm_floor(eps_norm, COMPUTE_DTYPE: tl.constexpr):
    """The norm floor in COMPUTE_DTYPE, from the kernels' ``eps_norm: tl.float64`` argument.

    A float argument without that annotation is typed fp32 at launch, so a
    float64 kernel would floor norms at 1e-6 rounded to fp32 (and a constexpr
    is folded as fp32 by triton 3.6). tl.full converts both what a compiled
    kernel gets (a float64 scalar) and what the interpreter passes (the Python
    float itself: triton 3.6's interpreter ignores the annotation) exactly.
    """
    return tl.full([], eps_norm, COMPUTE_DTYPE)


@triton.jit
def _spatial_offsets(positions, width, stride_h, stride_w):
    """Memory offsets of flat spatial positions p = h * W + w within one channel plane."""
    return (positions // width) * stride_h + (positions % width) * stride_w


@triton.jit
def _span(pid_span, n_position_blocks, channels_per_span, n_positions, n_channels, BLOCK_P: tl.constexpr):
    """A pair kernel's span: its positions, their mask, and its run of channels [first_channel, end_channel)."""
    positions = (pid_span % n_position_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    first_channel = (pid_span // n_position_blocks) * channels_per_span
    end_channel = tl.minimum(first_channel + channels_per_span, n_channels)
    return positions, positions < n_positions, first_channel, end_channel


@triton.jit
def _row_pointers(ptr, row_offsets, positions, width, stride_h, stride_w):
    """(rows, positions) pointers to channel 0 of the rows at ``row_offsets`` (rows,) from ``ptr``."""
    return ptr + row_offsets[:, None] + _spatial_offsets(positions, width, stride_h, stride_w)[None, :]


@triton.jit
def _other_rows_block(
    others_base, others_inv_base, others, n_others, positions, position_mask, width,
    stride_k, stride_h, stride_w, inv_stride_k,
    COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """A block of other rows, ``others`` (BLOCK_K,) their indices: row mask, (rows, positions) mask, pointers to
    channel 0, inverse norms.

    The caller forms the indices itself: torch.compile's mutation analysis of a
    kernel follows a stored pointer back through a called function's
    arguments, not its separate results, so an index returned from here beside
    the others' pointers would mark the others (the teacher, the negatives) as
    written, and every traced call would clone them.
    """
    others_mask = others < n_others
    mask = others_mask[:, None] & position_mask[None, :]
    rows = _row_pointers(others_base, others * stride_k, positions, width, stride_h, stride_w)
    inv_norm = _inverse_norm_tile(others_inv_base, others * inv_stride_k, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    return others_mask, mask, rows, inv_norm


@triton.jit
def _inverse_norm_tile(
    inv_norm_ptr, row_offsets, positions, mask, COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """The (rows, positions) tile of inverse channel norms; ones without normalisation (the multiply folds away)."""
    if NORMALIZE:
        return tl.load(inv_norm_ptr + row_offsets[:, None] + positions[None, :], mask=mask, other=0.0).to(COMPUTE_DTYPE)
    else:
        return tl.full([row_offsets.shape[0], positions.shape[0]], 1.0, COMPUTE_DTYPE)


@triton.jit
def _load_channel(row_ptrs, channel, stride_c, inv_norm, mask, COMPUTE_DTYPE: tl.constexpr):
    """One channel of a (rows, positions) tile, in COMPUTE_DTYPE, times its inverse norms; 0 where masked."""
    return tl.load(row_ptrs + channel * stride_c, mask=mask, other=0.0).to(COMPUTE_DTYPE) * inv_norm


@triton.jit
def _channel_block(first_channel, n_channels, position_mask, BLOCK_C: tl.constexpr):
    """Channels [first_channel, first_channel + BLOCK_C) and the (BLOCK_C, positions) mask of their tile."""
    channels = first_channel + tl.arange(0, BLOCK_C)
    return channels, (channels < n_channels)[:, None] & position_mask[None, :]


@triton.jit
def _load_channel_block(position_ptrs, channels, stride_c, mask, COMPUTE_DTYPE: tl.constexpr):
    """The (channels, positions) tile at ``position_ptrs`` (channel 0 of each position), in COMPUTE_DTYPE."""
    return tl.load(position_ptrs[None, :] + channels[:, None] * stride_c, mask=mask, other=0.0).to(COMPUTE_DTYPE)


@triton.jit
def _channel_inverse_norms_kernel(
    x_ptr, inv_norm_ptr,
    stride_outer, stride_inner, stride_c, stride_h, stride_w,
    n_inner, n_channels, width, n_positions, eps_norm: tl.float64,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """inv_norm[row, p] = 1 / max(||x[row, :, p]||_2, eps_norm) for rows of an (outer, inner, C, H, W) tensor."""
    pid_p = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    positions = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    position_mask = positions < n_positions
    spatial = (positions // width) * stride_h + (positions % width) * stride_w
    row_ptr = x_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    sum_sq = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        x = _load_channel_block(row_ptr + spatial, channels, stride_c, mask, COMPUTE_DTYPE)
        sum_sq += tl.sum(x * x, axis=0)
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), _norm_floor(eps_norm, COMPUTE_DTYPE))
    tl.store(inv_norm_ptr + row * n_positions + positions, inv_norm, mask=position_mask)


@triton.jit
def _channel_normalize_backward_kernel(
    x_ptr, grad_hat_ptr, grad_ptr,
    x_stride_outer, x_stride_inner, x_stride_c, x_stride_h, x_stride_w,
    grad_hat_stride_outer, grad_hat_stride_inner, grad_hat_stride_c, grad_hat_stride_h, grad_hat_stride_w,
    grad_stride_outer, grad_stride_inner, grad_stride_c, grad_stride_h, grad_stride_w,
    active_ptr, n_inner, n_channels, width, n_positions, eps_norm: tl.float64,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad = (grad_hat - x_hat <x_hat, grad_hat>) / ||x|| where ||x|| > eps_norm, else grad_hat / eps_norm.

    Per spatial position of each row of an (outer, inner, C, H, W) tensor;
    the inner products run over C. Rows with active[outer] == 0 get exactly 0.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    positions = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    position_mask = positions < n_positions
    h = positions // width
    w = positions % width
    x_row = x_ptr + outer * x_stride_outer + inner * x_stride_inner + h * x_stride_h + w * x_stride_w
    grad_hat_row = (
        grad_hat_ptr + outer * grad_hat_stride_outer + inner * grad_hat_stride_inner
        + h * grad_hat_stride_h + w * grad_hat_stride_w
    )
    grad_row = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner + h * grad_stride_h + w * grad_stride_w

    active = tl.load(active_ptr + outer) != 0
    sum_sq = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
    dot = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
        grad_hat = _load_channel_block(grad_hat_row, channels, grad_hat_stride_c, mask, COMPUTE_DTYPE)
        sum_sq += tl.sum(x * x, axis=0)
        dot += tl.sum(x * grad_hat, axis=0)
    norm = tl.sqrt(sum_sq)
    floor = _norm_floor(eps_norm, COMPUTE_DTYPE)
    inv_norm = 1.0 / tl.maximum(norm, floor)
    # <x_hat, grad_hat> / ||x|| times x_hat = x * dot / ||x||^3; below the floor phi is x / eps_norm, linear.
    projection = tl.where(norm > floor, dot * inv_norm * inv_norm * inv_norm, 0.0)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
        grad_hat = _load_channel_block(grad_hat_row, channels, grad_hat_stride_c, mask, COMPUTE_DTYPE)
        grad = tl.where(active, grad_hat * inv_norm[None, :] - x * projection[None, :], 0.0)
        tl.store(grad_row[None, :] + channels[:, None] * grad_stride_c, grad.to(grad_ptr.dtype.element_ty), mask=mask)
