"""Triton kernels of the FACD feature distances: forward and backward for every option.

The CUDA kernels of the ``facd_fast::feature_distances`` ops (schemas in
csrc/facd_ops.cpp, registered in :mod:`facd_fast.ops`): ``feature_distances_forward``
gives ``(d_pos, d_neg, saved)`` and ``feature_distances_backward`` the gradients
of ``sum(grad_pos * d_pos + grad_neg * d_neg)``; the ratio, mask and reduction
are O(B) PyTorch in :mod:`facd_fast.definition`. Kernels launch through
``torch.library.wrap_triton`` so that torch.compile traces into them.

Pairs. A row is one patch's (C, H, W) feature. An *anchor* row of batch index
b is compared with the *other* rows ``others[b, k]``, k < K_o, by
psi(anchor_hat - other_hat) summed over the C*H*W elements, where x_hat is x
after channel normalisation and psi is |x| (l1) or x^2 (l2). In-batch
negatives pass the teacher expanded to (B, B, C, H, W) with batch stride 0:
every anchor meets every teacher row, and a program loads a block of anchors
and a block of teacher rows once and forms all their pairs in registers.
Explicit negatives pass (B, K, C, H, W): each anchor has its own rows, so a
program holds one anchor (BLOCK_A = 1) and a block of its negatives. Nothing
of size (B, B, C, H, W) or (B, K, C, H, W) is ever written.

Tiles. A program owns a block of anchor rows, a block of BLOCK_P spatial
positions and a run of channels (a *span*); it computes the positions'
addresses and loads their inverse norms once, then loops over its channels,
loading one (rows, BLOCK_P) slice of each operand per channel. The channels
are cut into as many runs as it takes for the grid to fill the GPU.

Forward: per-span partial sums, written to a small (spans, B, K_o) buffer and
summed in a fixed order (deterministic, no atomics). Backward recomputes the
pairs: a program sweeps all other rows for its anchor elements, so every
gradient element is one register sum (no atomics either); a second kernel
takes the gradient through the channel normalisation. Loads cast to the
compute dtype (float32, float64 for float64 inputs) before any arithmetic.

In-batch negatives take two shortcuts. l1: when the student's gradient will
be asked for (``keep_state``), the forward's pair sweep also writes, per
student element, sign(s_hat_i - t_hat_i) and the sum over k != i of
sign(s_hat_i - t_hat_k) ((2, B, C, H, W) int8 for B <= 128: the only memory
kept between forward and backward besides the inputs), and the student's
backward is one elementwise kernel over them with the normalisation's chain
rule (``_l1_student_gradient_kernel``); the teacher's gradient still sweeps.
l2: no pairs at all, forward or backward: each program holds every row of its
positions and uses the per-element teacher mean m,
sum_{k != i} (a - t_k)^2 = B (a - m)^2 + sum_k (t_k - m)^2 - (a - t_i)^2
(``_l2_in_batch_sums_kernel``, ``_l2_in_batch_gradient_kernel``).

There is no faster non-deterministic (atomic) mode: the forward's partial
buffer is tiny and its fixed-order sum one small reduction, and the backward
needs no cross-program sum at all, so atomics could save at most that one
reduction; without a GPU to measure it on, it is not worth a second code path.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from facd_fast.definition import EPS_NORM, compute_dtype, sign_state_dtype

from .utils import on_device, split_evenly, target_programs, tl_compute_dtype

#: Most elements of the (BLOCK_A, BLOCK_K, BLOCK_P) pair tile one program holds in registers.
_PAIR_TILE_ELEMENTS = 8192
#: Largest anchor and other-row blocks.
_MAX_ROW_BLOCK = 16
_MAX_POSITION_BLOCK = 256
#: Elements of the (BLOCK_C, BLOCK_P) tile of the kernels that reduce over channels.
_CHANNEL_TILE_ELEMENTS = 2048
_MAX_CHANNEL_BLOCK = 32


@triton.jit
def _psi(diff, DISTANCE_L1: tl.constexpr):
    if DISTANCE_L1:
        return tl.abs(diff)
    else:
        return diff * diff


@triton.jit
def _psi_prime(diff, DISTANCE_L1: tl.constexpr):
    if DISTANCE_L1:
        # sign with sign(0) = 0, as autograd's abs has it
        return (diff > 0).to(diff.dtype) - (diff < 0).to(diff.dtype)
    else:
        return 2.0 * diff


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
    others_base, others_inv_base, first_other, n_others, positions, position_mask, width,
    stride_k, stride_h, stride_w, inv_stride_k,
    COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A block of other rows: indices, row mask, (rows, positions) mask, pointers to channel 0, inverse norms."""
    others = first_other + tl.arange(0, BLOCK_K)
    others_mask = others < n_others
    mask = others_mask[:, None] & position_mask[None, :]
    rows = _row_pointers(others_base, others * stride_k, positions, width, stride_h, stride_w)
    inv_norm = _inverse_norm_tile(others_inv_base, others * inv_stride_k, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    return others, others_mask, mask, rows, inv_norm


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
    n_inner, n_channels, width, n_positions, eps_norm,
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
    inv_norm = 1.0 / tl.maximum(tl.sqrt(sum_sq), eps_norm)
    tl.store(inv_norm_ptr + row * n_positions + positions, inv_norm, mask=position_mask)


@triton.jit
def _pair_distance_sums_kernel(
    anchor_ptr, others_ptr, positive_ptr,
    anchor_inv_ptr, others_inv_ptr, positive_inv_ptr,
    pair_sums_ptr, positive_sums_ptr, sign_state_ptr,
    anchor_stride_b, anchor_stride_c, anchor_stride_h, anchor_stride_w,
    others_stride_b, others_stride_k, others_stride_c, others_stride_h, others_stride_w,
    positive_stride_b, positive_stride_c, positive_stride_h, positive_stride_w,
    others_inv_stride_b, others_inv_stride_k,
    n_anchors, n_others, n_channels, n_positions, width, n_position_blocks, channels_per_span,
    COMPUTE_DTYPE: tl.constexpr, DISTANCE_L1: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_POSITIVE: tl.constexpr, KEEP_SIGNS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partial sums over one span of psi(anchor_hat[a] - others_hat[a, k]).

    A span is a block of BLOCK_P positions times a run of channels_per_span
    channels. pair_sums[span, a, k] gets the pair sums; with HAS_POSITIVE
    (explicit negatives) positive_sums[span, a] also gets the sums of
    psi(anchor_hat[a] - positive_hat[a]). Anchors and positives are
    (B, C, H, W) rows; their inverse norms are (B, H*W) contiguous.

    KEEP_SIGNS (l1, in-batch: the others are the anchors' own teachers, so
    the pair (a, a) is the positive one) also writes the sign state of the
    span's elements, (2, B, C, H*W) contiguous integers: sign(a_hat - t_hat_a)
    and the sum over k != a of sign(a_hat - t_hat_k). The program sums the
    latter over its blocks of other rows in place (it owns those elements).
    """
    pid_span = tl.program_id(0).to(tl.int64)
    pid_a = tl.program_id(1).to(tl.int64)
    anchors = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    anchor_mask = anchors < n_anchors
    positions, position_mask, first_channel, end_channel = _span(
        pid_span, n_position_blocks, channels_per_span, n_positions, n_channels, BLOCK_P
    )
    # Addresses and inverse norms of the tile's positions, once for the whole channel loop.
    mask_a = anchor_mask[:, None] & position_mask[None, :]
    anchor_rows = _row_pointers(
        anchor_ptr, anchors * anchor_stride_b, positions, width, anchor_stride_h, anchor_stride_w
    )
    anchor_inv = _inverse_norm_tile(anchor_inv_ptr, anchors * n_positions, positions, mask_a, COMPUTE_DTYPE, NORMALIZE)

    if HAS_POSITIVE:
        positive_rows = _row_pointers(
            positive_ptr, anchors * positive_stride_b, positions, width, positive_stride_h, positive_stride_w
        )
        positive_inv = _inverse_norm_tile(
            positive_inv_ptr, anchors * n_positions, positions, mask_a, COMPUTE_DTYPE, NORMALIZE
        )
        positive_acc = tl.zeros([BLOCK_A, BLOCK_P], dtype=COMPUTE_DTYPE)
        for channel in range(first_channel, end_channel):
            anchor = _load_channel(anchor_rows, channel, anchor_stride_c, anchor_inv, mask_a, COMPUTE_DTYPE)
            positive = _load_channel(positive_rows, channel, positive_stride_c, positive_inv, mask_a, COMPUTE_DTYPE)
            positive_acc += _psi(anchor - positive, DISTANCE_L1)
        tl.store(positive_sums_ptr + pid_span * n_anchors + anchors, tl.sum(positive_acc, axis=1), mask=anchor_mask)

    # others_stride_b is 0 when all anchors share the other rows (in-batch); otherwise
    # BLOCK_A == 1 and the other rows are this one anchor's.
    others_base = others_ptr + pid_a * BLOCK_A * others_stride_b
    others_inv_base = others_inv_ptr + pid_a * BLOCK_A * others_inv_stride_b
    for first_other in range(0, n_others, BLOCK_K):
        others, others_mask, mask_o, others_rows, others_inv = _other_rows_block(
            others_base, others_inv_base, first_other, n_others, positions, position_mask, width,
            others_stride_k, others_stride_h, others_stride_w, others_inv_stride_k, COMPUTE_DTYPE, NORMALIZE, BLOCK_K,
        )
        pair_acc = tl.zeros([BLOCK_A, BLOCK_K, BLOCK_P], dtype=COMPUTE_DTYPE)
        if KEEP_SIGNS:
            diagonal = anchors[:, None] == others[None, :]
            counted = others_mask[None, :] & (anchors[:, None] != others[None, :])
            has_diagonal = (anchors >= first_other) & (anchors < first_other + BLOCK_K)
        for channel in range(first_channel, end_channel):
            anchor = _load_channel(anchor_rows, channel, anchor_stride_c, anchor_inv, mask_a, COMPUTE_DTYPE)
            other = _load_channel(others_rows, channel, others_stride_c, others_inv, mask_o, COMPUTE_DTYPE)
            diff = anchor[:, None, :] - other[None, :, :]
            pair_acc += _psi(diff, DISTANCE_L1)
            if KEEP_SIGNS:
                sign = (diff > 0).to(tl.int32) - (diff < 0).to(tl.int32)
                state = sign_state_ptr + (anchors[:, None] * n_channels + channel) * n_positions + positions[None, :]
                negative = tl.sum(tl.where(counted[:, :, None], sign, 0), axis=1)
                if first_other > 0:
                    negative += tl.load(state + n_anchors * n_channels * n_positions, mask=mask_a, other=0).to(tl.int32)
                tl.store(state + n_anchors * n_channels * n_positions, negative.to(sign_state_ptr.dtype.element_ty),
                         mask=mask_a)
                positive = tl.sum(tl.where(diagonal[:, :, None], sign, 0), axis=1)
                tl.store(state, positive.to(sign_state_ptr.dtype.element_ty), mask=mask_a & has_diagonal[:, None])
        tl.store(
            pair_sums_ptr + (pid_span * n_anchors + anchors[:, None]) * n_others + others[None, :],
            tl.sum(pair_acc, axis=2),
            mask=anchor_mask[:, None] & others_mask[None, :],
        )


@triton.jit
def _pair_gradient_kernel(
    anchor_ptr, others_ptr, positive_ptr, weights_ptr, positive_weights_ptr,
    anchor_inv_ptr, others_inv_ptr, positive_inv_ptr, grad_ptr,
    anchor_stride_b, anchor_stride_k, anchor_stride_c, anchor_stride_h, anchor_stride_w,
    others_stride_b, others_stride_k, others_stride_c, others_stride_h, others_stride_w,
    positive_stride_b, positive_stride_c, positive_stride_h, positive_stride_w,
    grad_stride_b, grad_stride_k, grad_stride_c, grad_stride_h, grad_stride_w,
    weights_stride_b, weights_stride_k, others_inv_stride_b, others_inv_stride_k, active_ptr,
    n_anchor_rows, anchors_per_batch, n_others, n_channels, n_positions, width, n_position_blocks, channels_per_span,
    COMPUTE_DTYPE: tl.constexpr, DISTANCE_L1: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_POSITIVE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad[r] = sum_k weights[b, k] psi'(anchor_hat[r] - others_hat[b, k])
    (+ positive_weights[b] psi'(anchor_hat[r] - positive_hat[b]) with HAS_POSITIVE).

    The gradient with respect to anchor_hat, for anchor rows r = (b, j) of a
    (B, anchors_per_batch, C, H, W) tensor, over one span (a block of BLOCK_P
    positions times a run of channels). Positives are (B, C, H, W); anchor
    inverse norms are (n_anchor_rows, H*W) contiguous, positive ones (B, H*W).
    Rows of a batch b with active[b] == 0 (every weight 0) get exactly 0,
    whatever their features hold.
    """
    pid_span = tl.program_id(0).to(tl.int64)
    pid_a = tl.program_id(1).to(tl.int64)
    rows = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    row_mask = rows < n_anchor_rows
    batch = rows // anchors_per_batch
    within = rows % anchors_per_batch
    positions, position_mask, first_channel, end_channel = _span(
        pid_span, n_position_blocks, channels_per_span, n_positions, n_channels, BLOCK_P
    )
    # Addresses and inverse norms of the tile, once for the whole channel loop.
    mask_a = row_mask[:, None] & position_mask[None, :]
    active = tl.load(active_ptr + batch, mask=row_mask, other=0) != 0
    anchor_offsets = batch * anchor_stride_b + within * anchor_stride_k
    anchor_rows = _row_pointers(anchor_ptr, anchor_offsets, positions, width, anchor_stride_h, anchor_stride_w)
    anchor_inv = _inverse_norm_tile(anchor_inv_ptr, rows * n_positions, positions, mask_a, COMPUTE_DTYPE, NORMALIZE)
    grad_rows = _row_pointers(
        grad_ptr, batch * grad_stride_b + within * grad_stride_k, positions, width, grad_stride_h, grad_stride_w
    )
    if HAS_POSITIVE:
        positive_rows = _row_pointers(
            positive_ptr, batch * positive_stride_b, positions, width, positive_stride_h, positive_stride_w
        )
        positive_inv = _inverse_norm_tile(
            positive_inv_ptr, batch * n_positions, positions, mask_a, COMPUTE_DTYPE, NORMALIZE
        )
        positive_weight = tl.load(positive_weights_ptr + batch, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
    # others_stride_b is 0 when all anchors share the other rows (in-batch); otherwise
    # BLOCK_A == 1 and the other rows are this one anchor's batch's.
    first_batch = (pid_a * BLOCK_A) // anchors_per_batch
    others_base = others_ptr + first_batch * others_stride_b
    others_inv_base = others_inv_ptr + first_batch * others_inv_stride_b

    for first_other in range(0, n_others, BLOCK_K):
        # Addresses, inverse norms and weights of this block of other rows, once for the channel loop.
        others, others_mask, mask_o, others_rows, others_inv = _other_rows_block(
            others_base, others_inv_base, first_other, n_others, positions, position_mask, width,
            others_stride_k, others_stride_h, others_stride_w, others_inv_stride_k, COMPUTE_DTYPE, NORMALIZE, BLOCK_K,
        )
        weight = tl.load(
            weights_ptr + batch[:, None] * weights_stride_b + others[None, :] * weights_stride_k,
            mask=row_mask[:, None] & others_mask[None, :],
            other=0.0,
        ).to(COMPUTE_DTYPE)
        for channel in range(first_channel, end_channel):
            anchor = _load_channel(anchor_rows, channel, anchor_stride_c, anchor_inv, mask_a, COMPUTE_DTYPE)
            other = _load_channel(others_rows, channel, others_stride_c, others_inv, mask_o, COMPUTE_DTYPE)
            grad = tl.sum(weight[:, :, None] * _psi_prime(anchor[:, None, :] - other[None, :, :], DISTANCE_L1), axis=1)
            if first_other == 0:
                if HAS_POSITIVE:
                    positive = _load_channel(
                        positive_rows, channel, positive_stride_c, positive_inv, mask_a, COMPUTE_DTYPE
                    )
                    grad += positive_weight[:, None] * _psi_prime(anchor - positive, DISTANCE_L1)
            else:
                # what this program stored for the earlier blocks of other rows (grad_ptr is then COMPUTE_DTYPE)
                grad += tl.load(grad_rows + channel * grad_stride_c, mask=mask_a, other=0.0).to(COMPUTE_DTYPE)
            grad = tl.where(active[:, None], grad, 0.0)
            tl.store(grad_rows + channel * grad_stride_c, grad.to(grad_ptr.dtype.element_ty), mask=mask_a)


@triton.jit
def _channel_normalize_backward_kernel(
    x_ptr, grad_hat_ptr, grad_ptr,
    x_stride_outer, x_stride_inner, x_stride_c, x_stride_h, x_stride_w,
    grad_hat_stride_outer, grad_hat_stride_inner, grad_hat_stride_c, grad_hat_stride_h, grad_hat_stride_w,
    grad_stride_outer, grad_stride_inner, grad_stride_c, grad_stride_h, grad_stride_w,
    active_ptr, n_inner, n_channels, width, n_positions, eps_norm,
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
    inv_norm = 1.0 / tl.maximum(norm, eps_norm)
    # <x_hat, grad_hat> / ||x|| times x_hat = x * dot / ||x||^3; below the floor phi is x / eps_norm, linear.
    projection = tl.where(norm > eps_norm, dot * inv_norm * inv_norm * inv_norm, 0.0)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
        grad_hat = _load_channel_block(grad_hat_row, channels, grad_hat_stride_c, mask, COMPUTE_DTYPE)
        grad = tl.where(active, grad_hat * inv_norm[None, :] - x * projection[None, :], 0.0)
        tl.store(grad_row[None, :] + channels[:, None] * grad_stride_c, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l1_student_gradient_kernel(
    x_ptr, sign_state_ptr, coefficients_ptr, grad_ptr,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    grad_stride_b, grad_stride_c, grad_stride_h, grad_stride_w,
    n_rows, n_channels, width, n_positions, eps_norm,
    COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The l1 in-batch student gradient from the forward's sign state, one elementwise pass per channel loop.

    grad_hat = p_i sign_pos + n_i sign_neg with (p_i, n_i) = coefficients[i]
    (upstream gradients over N and N (B - 1)), then the normalisation's chain
    rule (the row's norm is recomputed in the same channel loop). A row with
    p_i = n_i = 0 gets exactly 0 and its features are not used.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    positions = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    position_mask = positions < n_positions
    spatial = (positions // width)
    within = positions % width
    x_row = x_ptr + row * x_stride_b + spatial * x_stride_h + within * x_stride_w
    grad_row = grad_ptr + row * grad_stride_b + spatial * grad_stride_h + within * grad_stride_w
    state_row = sign_state_ptr + row * n_channels * n_positions + positions
    plane = n_rows * n_channels * n_positions
    p = tl.load(coefficients_ptr + 2 * row).to(COMPUTE_DTYPE)
    n = tl.load(coefficients_ptr + 2 * row + 1).to(COMPUTE_DTYPE)
    active = (p != 0) | (n != 0)
    if NORMALIZE:
        sum_sq = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
        dot = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
        for first_channel in range(0, n_channels, BLOCK_C):
            channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
            x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
            signs = state_row[None, :] + channels[:, None] * n_positions
            grad_hat = p * tl.load(signs, mask=mask, other=0).to(COMPUTE_DTYPE) + n * tl.load(
                signs + plane, mask=mask, other=0).to(COMPUTE_DTYPE)
            sum_sq += tl.sum(x * x, axis=0)
            dot += tl.sum(x * grad_hat, axis=0)
        norm = tl.sqrt(sum_sq)
        inv_norm = 1.0 / tl.maximum(norm, eps_norm)
        projection = tl.where(norm > eps_norm, dot * inv_norm * inv_norm * inv_norm, 0.0)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        signs = state_row[None, :] + channels[:, None] * n_positions
        grad = p * tl.load(signs, mask=mask, other=0).to(COMPUTE_DTYPE) + n * tl.load(
            signs + plane, mask=mask, other=0).to(COMPUTE_DTYPE)
        if NORMALIZE:
            x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
            grad = tl.where(active, grad * inv_norm[None, :] - x * projection[None, :], 0.0)
        tl.store(grad_row[None, :] + channels[:, None] * grad_stride_c, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_in_batch_sums_kernel(
    student_ptr, teacher_ptr, student_inv_ptr, teacher_inv_ptr, partial_ptr,
    student_stride_b, student_stride_c, student_stride_h, student_stride_w,
    teacher_stride_b, teacher_stride_c, teacher_stride_h, teacher_stride_w,
    n_rows, n_channels, n_positions, width, n_position_blocks, channels_per_span,
    COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """l2 with in-batch negatives in closed form over one span: no pairs.

    partial[span, i] = (sum (s_i - t_i)^2, sum over k != i of (s_i - t_k)^2),
    the latter as B (s_i - m)^2 + sum_k (t_k - m)^2 - (s_i - t_i)^2 per
    element with m = mean_k t_k (centred: no cancellation of large terms).
    Every row is in the tile (BLOCK_B >= B).
    """
    pid_span = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    positions, position_mask, first_channel, end_channel = _span(
        pid_span, n_position_blocks, channels_per_span, n_positions, n_channels, BLOCK_P
    )
    mask = row_mask[:, None] & position_mask[None, :]
    student_rows = _row_pointers(student_ptr, rows * student_stride_b, positions, width, student_stride_h,
                                 student_stride_w)
    teacher_rows = _row_pointers(teacher_ptr, rows * teacher_stride_b, positions, width, teacher_stride_h,
                                 teacher_stride_w)
    student_inv = _inverse_norm_tile(student_inv_ptr, rows * n_positions, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    teacher_inv = _inverse_norm_tile(teacher_inv_ptr, rows * n_positions, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    positive_acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=COMPUTE_DTYPE)
    deviation_acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=COMPUTE_DTYPE)
    spread_acc = tl.zeros([BLOCK_P], dtype=COMPUTE_DTYPE)
    for channel in range(first_channel, end_channel):
        teacher = _load_channel(teacher_rows, channel, teacher_stride_c, teacher_inv, mask, COMPUTE_DTYPE)
        student = _load_channel(student_rows, channel, student_stride_c, student_inv, mask, COMPUTE_DTYPE)
        mean = tl.sum(teacher, axis=0) / n_rows
        centred = tl.where(mask, teacher - mean[None, :], 0.0)
        spread_acc += tl.sum(centred * centred, axis=0)
        positive = student - teacher
        deviation = tl.where(mask, student - mean[None, :], 0.0)
        positive_acc += positive * positive
        deviation_acc += deviation * deviation
    positive_sum = tl.sum(positive_acc, axis=1)
    negative_sum = n_rows * tl.sum(deviation_acc, axis=1) + tl.sum(spread_acc, axis=0) - positive_sum
    out = partial_ptr + (pid_span * n_rows + rows) * 2
    tl.store(out, positive_sum, mask=row_mask)
    tl.store(out + 1, negative_sum, mask=row_mask)


@triton.jit
def _l2_in_batch_gradient_kernel(
    student_ptr, teacher_ptr, student_inv_ptr, teacher_inv_ptr, grad_pos_ptr, weights_ptr,
    student_grad_ptr, teacher_grad_ptr,
    student_stride_b, student_stride_c, student_stride_h, student_stride_w,
    teacher_stride_b, teacher_stride_c, teacher_stride_h, teacher_stride_w,
    student_grad_stride_b, student_grad_stride_c, student_grad_stride_h, student_grad_stride_w,
    teacher_grad_stride_b, teacher_grad_stride_c, teacher_grad_stride_h, teacher_grad_stride_w,
    n_rows, n_channels, n_positions, width, n_position_blocks, channels_per_span,
    COMPUTE_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, NEED_STUDENT: tl.constexpr, NEED_TEACHER: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """l2 in-batch gradients with respect to s_hat and t_hat in closed form over one span.

    With g_i = grad_pos[i] and w_i = weights[i] (the 2 / N of the mean and,
    for w, the 1 / (B - 1) folded in), m = mean_k t_hat_k:
      student: g_i (s_i - t_i) + w_i (B (s_i - m) - (s_i - t_i))
      teacher: -(g_k (s_k - t_k) + sum_{i != k} w_i s_i - (sum_{i != k} w_i) t_k)
    A student row with g_i = w_i = 0 is never read and gets exactly 0.
    """
    pid_span = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    row_mask = rows < n_rows
    positions, position_mask, first_channel, end_channel = _span(
        pid_span, n_position_blocks, channels_per_span, n_positions, n_channels, BLOCK_P
    )
    mask = row_mask[:, None] & position_mask[None, :]
    student_rows = _row_pointers(student_ptr, rows * student_stride_b, positions, width, student_stride_h,
                                 student_stride_w)
    teacher_rows = _row_pointers(teacher_ptr, rows * teacher_stride_b, positions, width, teacher_stride_h,
                                 teacher_stride_w)
    student_inv = _inverse_norm_tile(student_inv_ptr, rows * n_positions, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    teacher_inv = _inverse_norm_tile(teacher_inv_ptr, rows * n_positions, positions, mask, COMPUTE_DTYPE, NORMALIZE)
    student_grad_rows = _row_pointers(student_grad_ptr, rows * student_grad_stride_b, positions, width,
                                      student_grad_stride_h, student_grad_stride_w)
    teacher_grad_rows = _row_pointers(teacher_grad_ptr, rows * teacher_grad_stride_b, positions, width,
                                      teacher_grad_stride_h, teacher_grad_stride_w)
    g = tl.load(grad_pos_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
    w = tl.load(weights_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
    active = (g != 0) | (w != 0)
    rest_weight = tl.sum(w, axis=0) - w
    for channel in range(first_channel, end_channel):
        teacher = _load_channel(teacher_rows, channel, teacher_stride_c, teacher_inv, mask, COMPUTE_DTYPE)
        student = _load_channel(student_rows, channel, student_stride_c, student_inv, mask & active[:, None],
                                COMPUTE_DTYPE)
        positive = student - teacher
        if NEED_STUDENT:
            mean = tl.sum(teacher, axis=0) / n_rows
            grad = (g - w)[:, None] * positive + (n_rows * w)[:, None] * (student - mean[None, :])
            grad = tl.where(active[:, None], grad, 0.0)
            tl.store(student_grad_rows + channel * student_grad_stride_c,
                     grad.to(student_grad_ptr.dtype.element_ty), mask=mask)
        if NEED_TEACHER:
            weighted = tl.where((w != 0)[:, None], w[:, None] * student, 0.0)
            own = tl.where((g != 0)[:, None], g[:, None] * positive, 0.0) - weighted
            grad = rest_weight[:, None] * teacher - tl.sum(weighted, axis=0)[None, :] - own
            tl.store(teacher_grad_rows + channel * teacher_grad_stride_c,
                     grad.to(teacher_grad_ptr.dtype.element_ty), mask=mask)


# --- host launchers ------------------------------------------------------------------------------


def _rows_view(x: Tensor) -> Tensor:
    """x as (outer, inner, C, H, W): a (B, C, H, W) feature gets inner = 1 (a view, no copy)."""
    return x.unsqueeze(1) if x.dim() == 4 else x


def _flags(x: Tensor, distance: str, normalize: str) -> dict:
    """The pair kernels' constexpr flags and compile options for inputs like x."""
    return dict(
        COMPUTE_DTYPE=tl_compute_dtype(x.dtype),
        DISTANCE_L1=distance == "l1",
        NORMALIZE=normalize == "channel",
        # l1 takes sign(a_hat - o_hat) with sign(0) = 0: a fused multiply-add of the
        # normalisation into the difference would turn an exact tie into a rounding
        # residue of either sign. l1 has no multiply-add per pair to lose; l2 keeps fusion.
        enable_fp_fusion=distance != "l1",
    )


def _inverse_norms(x: Tensor, normalize: str) -> Tensor:
    """:func:`channel_inverse_norms` of x, or, without normalisation, an unread one-element placeholder of its shape."""
    if normalize == "channel":
        return channel_inverse_norms(x)
    return x.new_empty((), dtype=compute_dtype(x.dtype)).expand(*x.shape[:-3], x.shape[-2] * x.shape[-1])


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


def channel_inverse_norms(x: Tensor) -> Tensor:
    """1 / max(||v||_2, EPS_NORM) of every position's C-vector v.

    x: (B, C, H, W) or (B, K, C, H, W), any strides, float16/bfloat16/float32/float64.
    Returns (B, H*W) or (B, K, H*W), contiguous, in ``compute_dtype(x.dtype)``.
    """
    rows = _rows_view(x)
    outer, inner, channels, height, width = rows.shape
    n_positions = height * width
    inv_norm = torch.empty((outer, inner, n_positions), dtype=compute_dtype(x.dtype), device=x.device)
    blocks = _channel_blocks(channels, n_positions)
    grid = (triton.cdiv(n_positions, blocks["BLOCK_P"]), outer * inner)
    with on_device(x):
        wrap_triton(_channel_inverse_norms_kernel)[grid](
            rows, inv_norm, *rows.stride(), inner, channels, width, n_positions, EPS_NORM,
            COMPUTE_DTYPE=tl_compute_dtype(x.dtype), **blocks,
        )
    return inv_norm if x.dim() == 5 else inv_norm.squeeze(1)


def _pair_distance_sums(
    anchor: Tensor, others: Tensor, positive: Optional[Tensor],
    anchor_inv: Tensor, others_inv: Tensor, positive_inv: Optional[Tensor],
    distance: str, normalize: str, sign_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Sums over C*H*W of psi(anchor_hat[a] - others_hat[a, k]) (and of psi(anchor_hat[a] - positive_hat[a])).

    anchor, positive: (B, C, H, W); others: (B, K_o, C, H, W), batch stride 0
    when shared by every anchor. *_inv: the matching inverse norms (others_inv
    expanded like others). sign_state: (2, B, C, H, W) integers to fill (l1,
    in-batch: others are the teacher) or None. Returns (B, K_o) and (B,) or None.
    """
    batch, n_others = others.shape[:2]
    _, channels, height, width = anchor.shape
    n_positions = height * width
    blocks = _pair_blocks(batch, n_others, n_positions, others.stride(0) == 0, anchor.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    anchor_blocks = triton.cdiv(batch, blocks["BLOCK_A"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, anchor_blocks, anchor.device)
    dtype = compute_dtype(anchor.dtype)
    pair_sums = torch.empty((n_spans, batch, n_others), dtype=dtype, device=anchor.device)
    has_positive = positive is not None
    positive_sums = torch.empty((n_spans, batch), dtype=dtype, device=anchor.device) if has_positive else pair_sums
    if not has_positive:  # the kernel never reads them; any tensor of the right rank fills the slots
        positive, positive_inv = anchor, anchor_inv
    keep_signs = sign_state is not None
    with on_device(anchor):
        wrap_triton(_pair_distance_sums_kernel)[(n_spans, anchor_blocks)](
            anchor, others, positive, anchor_inv, others_inv, positive_inv, pair_sums, positive_sums,
            sign_state if keep_signs else pair_sums,
            *anchor.stride(), *others.stride(), *positive.stride(), others_inv.stride(0), others_inv.stride(1),
            batch, n_others, channels, n_positions, width, n_position_blocks, channels_per_span,
            HAS_POSITIVE=has_positive, KEEP_SIGNS=keep_signs, **_flags(anchor, distance, normalize), **blocks,
        )
    return pair_sums.sum(dim=0), positive_sums.sum(dim=0) if has_positive else None


def _in_batch_blocks(batch: int, n_positions: int, dtype: torch.dtype) -> dict:
    """Block sizes of the l2 closed-form kernels' (all rows, positions) tile: a channel tile's worth of elements,
    as several such tiles (student, teacher, their gradients) are live at once."""
    block_b = triton.next_power_of_2(batch)
    tile = _CHANNEL_TILE_ELEMENTS // (2 if dtype == torch.float64 else 1)
    return dict(BLOCK_B=block_b, BLOCK_P=min(triton.next_power_of_2(n_positions), _MAX_POSITION_BLOCK,
                                             max(16, tile // block_b)))


def _l2_in_batch_distances(student: Tensor, teacher: Tensor, normalize: str,
                           student_inv: Tensor, teacher_inv: Tensor) -> Tuple[Tensor, Tensor]:
    """(d_pos, d_neg) of l2 with in-batch negatives in closed form: O(B C H W) work, no pairs."""
    batch, channels, height, width = student.shape
    n_positions = height * width
    blocks = _in_batch_blocks(batch, n_positions, student.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, 1, student.device)
    partial = torch.empty((n_spans, batch, 2), dtype=compute_dtype(student.dtype), device=student.device)
    with on_device(student):
        wrap_triton(_l2_in_batch_sums_kernel)[(n_spans,)](
            student, teacher, student_inv, teacher_inv, partial, *student.stride(), *teacher.stride(),
            batch, channels, n_positions, width, n_position_blocks, channels_per_span,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalize == "channel", **blocks,
        )
    sums = partial.sum(dim=0)
    n_elements = channels * n_positions
    return sums[:, 0] / n_elements, sums[:, 1] / ((batch - 1) * n_elements)


def feature_distances_forward(
    student: Tensor, teacher: Tensor, negatives: Optional[Tensor], distance: str, normalize: str,
    keep_state: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_pos, d_neg, saved): see :func:`facd_fast.reference.feature_distances` for the distances.

    student, teacher: (B, C, H, W); negatives: (B, K, C, H, W) or None
    (in-batch); any strides; float16, bfloat16, float32 or float64. d_pos,
    d_neg: (B,) in ``compute_dtype``.

    l2 with in-batch negatives runs in closed form (no pairs). l1 with in-batch
    negatives sweeps the B x B pairs once; with ``keep_state`` it also returns
    what the student's gradient needs, so that the backward is one
    elementwise pass: saved (2, B, C, H, W) of ``sign_state_dtype(B)`` (int8
    for B <= 128: 2 bytes per student element kept between forward and
    backward), [0] = sign(s_hat - t_hat) and [1] = the sum over k != i of
    sign(s_hat_i - t_hat_k). Otherwise saved is an empty int8 tensor.
    """
    batch = student.shape[0]
    n_elements = student[0].numel()
    student_inv, teacher_inv = _inverse_norms(student, normalize), _inverse_norms(teacher, normalize)
    no_state = student.new_empty((0,), dtype=torch.int8)
    if negatives is None and distance == "l2":
        return (*_l2_in_batch_distances(student, teacher, normalize, student_inv, teacher_inv), no_state)
    if negatives is None:
        sign_state = None
        if keep_state:
            if batch > 32768:
                raise ValueError(f"l1 with in-batch negatives keeps its sign sums for B <= 32768, got B={batch}")
            sign_state = torch.empty((2, *student.shape), dtype=sign_state_dtype(batch), device=student.device)
        others = teacher.unsqueeze(0).expand(batch, *teacher.shape)
        others_inv = teacher_inv.unsqueeze(0).expand(batch, *teacher_inv.shape)
        sums, _ = _pair_distance_sums(
            student, others, None, student_inv, others_inv, None, distance, normalize, sign_state
        )
        diagonal = torch.eye(batch, dtype=torch.bool, device=student.device)
        d_pos = sums.diagonal() / n_elements
        d_neg = sums.masked_fill(diagonal, 0).sum(dim=1) / ((batch - 1) * n_elements)
        return d_pos, d_neg, no_state if sign_state is None else sign_state
    negatives_inv = _inverse_norms(negatives, normalize)
    sums, positive_sums = _pair_distance_sums(
        student, negatives, teacher, student_inv, negatives_inv, teacher_inv, distance, normalize
    )
    return positive_sums / n_elements, sums.sum(dim=1) / (negatives.shape[1] * n_elements), no_state


def _anchor_gradient(
    anchor: Tensor, others: Tensor, weights: Tensor,
    anchor_inv: Tensor, others_inv: Tensor,
    positive: Optional[Tensor], positive_weights: Optional[Tensor], positive_inv: Optional[Tensor],
    distance: str, normalize: str,
) -> Tensor:
    """Gradient of sum_{b,k} weights[b, k] d(anchor[b, j], others[b, k]) (+ positive terms) w.r.t. anchor.

    anchor: (B, J, C, H, W), others: (B, K_o, C, H, W) (batch stride 0 when
    shared), weights: (B, K_o) with the 1/(C*H*W) of the mean folded in;
    positive: (B, C, H, W) with positive_weights (B,), or None. Returns a
    tensor like ``anchor``, in its dtype and strides.
    """
    n_rows_outer, per_batch, channels, height, width = anchor.shape
    n_rows = n_rows_outer * per_batch
    n_positions = height * width
    n_others = others.shape[1]
    blocks = _pair_blocks(n_rows, n_others, n_positions, others.stride(0) == 0, anchor.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    row_blocks = triton.cdiv(n_rows, blocks["BLOCK_A"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, row_blocks, anchor.device)
    grad = torch.empty_like(anchor)
    normalized = normalize == "channel"
    dtype = compute_dtype(anchor.dtype)
    # The gradient w.r.t. anchor_hat goes to a whole compute-dtype buffer when phi's backward
    # needs every channel of it at a position, or when several blocks of other rows add up in it.
    accumulates = n_others > blocks["BLOCK_K"]
    buffered = normalized or (accumulates and anchor.dtype != dtype)
    grad_hat = torch.empty(anchor.shape, dtype=dtype, device=anchor.device) if buffered else grad
    has_positive = positive is not None
    # a batch whose weights are all 0 (a masked-out patch) gets exactly 0, even from non-finite features
    active = (weights != 0).any(dim=1)
    if has_positive:
        active = active | (positive_weights != 0)
    active = active.to(torch.int8)
    if not has_positive:  # the kernel never reads them; any tensors of the right rank fill the slots
        positive, positive_weights, positive_inv = anchor[:, 0], weights, anchor_inv
    with on_device(anchor):
        wrap_triton(_pair_gradient_kernel)[(n_spans, row_blocks)](
            anchor, others, positive, weights, positive_weights, anchor_inv, others_inv, positive_inv, grad_hat,
            *anchor.stride(), *others.stride(), *positive.stride(), *grad_hat.stride(),
            *weights.stride(), others_inv.stride(0), others_inv.stride(1), active,
            n_rows, per_batch, n_others, channels, n_positions, width, n_position_blocks, channels_per_span,
            HAS_POSITIVE=has_positive, **_flags(anchor, distance, normalize), **blocks,
        )
        if not normalized and buffered:
            grad.copy_(grad_hat)
        if normalized:
            channel_blocks = _channel_blocks(channels, n_positions)
            wrap_triton(_channel_normalize_backward_kernel)[(triton.cdiv(n_positions, channel_blocks["BLOCK_P"]), n_rows)](
                anchor, grad_hat, grad, *anchor.stride(), *grad_hat.stride(), *grad.stride(),
                active, per_batch, channels, width, n_positions, EPS_NORM,
                COMPUTE_DTYPE=tl_compute_dtype(anchor.dtype), **channel_blocks,
            )
    return grad


def _l1_student_gradient(grad_pos: Tensor, grad_neg: Tensor, student: Tensor, sign_state: Tensor,
                         normalize: str) -> Tensor:
    """The l1 in-batch student gradient from the forward's sign state: one elementwise pass.

    grad_pos, grad_neg: (B,) upstream gradients already divided by C*H*W.
    """
    batch, channels, height, width = student.shape
    n_positions = height * width
    coefficients = torch.stack((grad_pos, grad_neg / (batch - 1)), dim=1).contiguous()
    grad = torch.empty_like(student)
    blocks = _channel_blocks(channels, n_positions)
    with on_device(student):
        wrap_triton(_l1_student_gradient_kernel)[(triton.cdiv(n_positions, blocks["BLOCK_P"]), batch)](
            student, sign_state, coefficients, grad, *student.stride(), *grad.stride(),
            batch, channels, width, n_positions, EPS_NORM,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalize == "channel", **blocks,
        )
    return grad


def _l2_in_batch_gradients(grad_pos: Tensor, grad_neg: Tensor, student: Tensor, teacher: Tensor, normalize: str,
                           student_inv: Tensor, teacher_inv: Tensor, need_student: bool, need_teacher: bool):
    """l2 in-batch gradients in closed form: one pass for s_hat and t_hat, then the normalisation's chain rule.

    grad_pos, grad_neg: (B,) upstream gradients already divided by C*H*W.
    """
    batch, channels, height, width = student.shape
    n_positions = height * width
    normalized = normalize == "channel"
    dtype = compute_dtype(student.dtype)
    grad_pos, weights = (2 * grad_pos).contiguous(), (2 * grad_neg / (batch - 1)).contiguous()

    def output(x: Tensor, needed: bool) -> Tensor:
        if not needed:
            return student.new_empty((1, 1, 1, 1))  # never written (the kernel's flag is off)
        return torch.empty(x.shape, dtype=dtype, device=x.device) if normalized else torch.empty_like(x)

    student_hat, teacher_hat = output(student, need_student), output(teacher, need_teacher)
    blocks = _in_batch_blocks(batch, n_positions, student.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, 1, student.device)
    with on_device(student):
        wrap_triton(_l2_in_batch_gradient_kernel)[(n_spans,)](
            student, teacher, student_inv, teacher_inv, grad_pos, weights, student_hat, teacher_hat,
            *student.stride(), *teacher.stride(), *student_hat.stride(), *teacher_hat.stride(),
            batch, channels, n_positions, width, n_position_blocks, channels_per_span,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalized,
            NEED_STUDENT=need_student, NEED_TEACHER=need_teacher, **blocks,
        )
    if not normalized:
        return (student_hat if need_student else None), (teacher_hat if need_teacher else None)
    student_active = ((grad_pos != 0) | (weights != 0)).to(torch.int8)
    teacher_active = torch.ones(batch, dtype=torch.int8, device=student.device)
    grads = []
    channel_blocks = _channel_blocks(channels, n_positions)
    for x, grad_hat, active, needed in ((student, student_hat, student_active, need_student),
                                        (teacher, teacher_hat, teacher_active, need_teacher)):
        if not needed:
            grads.append(None)
            continue
        grad = torch.empty_like(x)
        rows, hat_rows, grad_rows = _rows_view(x), _rows_view(grad_hat), _rows_view(grad)
        with on_device(x):
            wrap_triton(_channel_normalize_backward_kernel)[(triton.cdiv(n_positions, channel_blocks["BLOCK_P"]), batch)](
                rows, hat_rows, grad_rows, *rows.stride(), *hat_rows.stride(), *grad_rows.stride(),
                active, 1, channels, width, n_positions, EPS_NORM,
                COMPUTE_DTYPE=tl_compute_dtype(x.dtype), **channel_blocks,
            )
        grads.append(grad)
    return tuple(grads)


def feature_distances_backward(
    grad_pos: Tensor, grad_neg: Tensor,
    student: Tensor, teacher: Tensor, negatives: Optional[Tensor], saved: Tensor,
    distance: str, normalize: str, output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_pos * d_pos + grad_neg * d_neg) w.r.t. student, teacher, negatives.

    grad_pos, grad_neg: (B,) upstream gradients; saved: what the forward kept
    (empty if nothing); output_mask: which of the three gradients to compute;
    the rest as in :func:`feature_distances_forward`. Each gradient is shaped,
    typed and strided like its input where asked for, an empty tensor where
    not (tests/closed_form.py has the formulas). In-batch: l2 in closed form
    (one pass); l1's student from the saved sign sums when kept (one pass),
    its teacher by a sweep over the pairs. A patch whose upstream gradients
    are both 0 gets exactly 0, whatever its features hold.
    """
    need_student, need_teacher, need_negatives = output_mask
    batch = student.shape[0]
    n_elements = student[0].numel()
    dtype = compute_dtype(student.dtype)
    grad_pos = grad_pos.to(dtype) / n_elements
    grad_neg = grad_neg.to(dtype) / n_elements
    # custom ops may not return aliases: one empty tensor per gradient not asked for
    g_student, g_teacher, g_negatives = (student.new_empty((0,)) for _ in range(3))
    if negatives is None and distance == "l1" and need_student and saved.numel() > 0:
        g_student = _l1_student_gradient(grad_pos, grad_neg, student, saved, normalize)
        need_student = False
        if not need_teacher:
            return g_student, g_teacher, g_negatives
    student_inv, teacher_inv = _inverse_norms(student, normalize), _inverse_norms(teacher, normalize)
    if negatives is None and distance == "l2":
        s, t = _l2_in_batch_gradients(grad_pos, grad_neg, student, teacher, normalize, student_inv, teacher_inv,
                                      need_student, need_teacher)
        return (g_student if s is None else s), (g_teacher if t is None else t), g_negatives
    # inverse norms of a (B, C, H, W) feature viewed as (B, 1, C, H, W) rows
    student_rows, teacher_rows = student.unsqueeze(1), teacher.unsqueeze(1)
    student_rows_inv, teacher_rows_inv = student_inv.unsqueeze(1), teacher_inv.unsqueeze(1)

    if negatives is None:
        # weights[i, k] of the pair (s_i, t_k): grad_neg_i / (B - 1) off the diagonal, grad_pos_i on it
        weights = (grad_neg / (batch - 1)).unsqueeze(1).expand(batch, batch).clone()
        weights.diagonal().copy_(grad_pos)
        if need_student:
            g_student = _anchor_gradient(
                student_rows, teacher.unsqueeze(0).expand(batch, *teacher.shape), weights,
                student_inv, teacher_inv.unsqueeze(0).expand(batch, *teacher_inv.shape),
                None, None, None, distance, normalize,
            ).squeeze(1)
        if need_teacher:
            # d/dt_k of psi(s_i - t_k) is psi'(t_k - s_i): t_k is the anchor, the students its others
            g_teacher = _anchor_gradient(
                teacher_rows, student.unsqueeze(0).expand(batch, *student.shape), weights.t(),
                teacher_inv, student_inv.unsqueeze(0).expand(batch, *student_inv.shape),
                None, None, None, distance, normalize,
            ).squeeze(1)
        return g_student, g_teacher, g_negatives

    n_negatives = negatives.shape[1]
    negatives_inv = _inverse_norms(negatives, normalize)
    negative_weights = (grad_neg / n_negatives).unsqueeze(1)  # (B, 1): the same weight for each k
    if need_student:
        g_student = _anchor_gradient(
            student_rows, negatives, negative_weights.expand(batch, n_negatives),
            student_inv, negatives_inv, teacher, grad_pos, teacher_inv, distance, normalize,
        ).squeeze(1)
    if need_teacher:
        g_teacher = _anchor_gradient(
            teacher_rows, student_rows, grad_pos.unsqueeze(1),
            teacher_inv, student_rows_inv, None, None, None, distance, normalize,
        ).squeeze(1)
    if need_negatives:
        g_negatives = _anchor_gradient(
            negatives, student_rows, negative_weights,
            negatives_inv.flatten(0, 1), student_rows_inv, None, None, None, distance, normalize,
        )
    return g_student, g_teacher, g_negatives
