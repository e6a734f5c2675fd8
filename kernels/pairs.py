"""Triton pair kernels of the FACD feature distances: distance sums, their gradient, l1's student gradient.

Pairs. A row is one patch's (C, H, W) feature. An *anchor* row of batch index
b is compared with the *other* rows ``others[b, k]``, k < K_o, by
psi(anchor_hat - other_hat) summed over the C*H*W elements, where x_hat is x
after channel normalisation and psi is |x| (l1) or x^2 (l2). In-batch
negatives pass the teacher expanded to (B, B, C, H, W) with batch stride 0:
every anchor meets every teacher row, and a program loads a block of anchors
and a block of teacher rows once and forms all their pairs in registers.
Explicit negatives pass (B, K, C, H, W): each anchor has its own rows, so a
program holds one anchor (BLOCK_A = 1) and a block of its negatives. Nothing
of size (B, B, C, H, W) or (B, K, C, H, W) is ever written. A program's tile
is a span (:mod:`facd_fast.kernels.feature_rows`).

Forward: per-span partial sums, written to a small (spans, B, K_o) buffer and
summed in a fixed order (deterministic, no atomics). Backward recomputes the
pairs: a program sweeps all other rows for its anchor elements, so every
gradient element is one register sum (no atomics either); a second kernel
takes the gradient through the channel normalisation. Loads cast to the
compute dtype (float32, float64 for float64 inputs) before any arithmetic.

l1 with in-batch negatives takes a shortcut: when the student's gradient will
be asked for (``keep_state``), the forward's pair sweep also writes, per
student element, sign(s_hat_i - t_hat_i) and the sum over k != i of
sign(s_hat_i - t_hat_k) ((2, B, C, H, W) int8 for B <= 128: the only memory
kept between forward and backward besides the inputs), and the student's
backward is one elementwise kernel over them with the normalisation's chain
rule (``_l1_student_gradient_kernel``); the teacher's gradient still sweeps.

There is no faster non-deterministic (atomic) mode: the forward's partial
buffer is tiny and its fixed-order sum one small reduction, and the backward
needs no cross-program sum at all, so atomics could save at most that one
reduction; without a GPU to measure it on, it is not worth a second code path.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .feature_rows import (
    _channel_block, _inverse_norm_tile, _load_channel, _load_channel_block, _norm_floor, _other_rows_block,
    _row_pointers, _span,
)


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
        others = first_other + tl.arange(0, BLOCK_K)
        others_mask, mask_o, others_rows, others_inv = _other_rows_block(
            others_base, others_inv_base, others, n_others, positions, position_mask, width,
            others_stride_k, others_stride_h, others_stride_w, others_inv_stride_k, COMPUTE_DTYPE, NORMALIZE,
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
        others = first_other + tl.arange(0, BLOCK_K)
        others_mask, mask_o, others_rows, others_inv = _other_rows_block(
            others_base, others_inv_base, others, n_others, positions, position_mask, width,
            others_stride_k, others_stride_h, others_stride_w, others_inv_stride_k, COMPUTE_DTYPE, NORMALIZE,
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
def _l1_student_gradient_kernel(
    x_ptr, sign_state_ptr, coefficients_ptr, grad_ptr,
    x_stride_b, x_stride_c, x_stride_h, x_stride_w,
    grad_stride_b, grad_stride_c, grad_stride_h, grad_stride_w,
    n_rows, n_channels, width, n_positions, eps_norm: tl.float64,
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
        floor = _norm_floor(eps_norm, COMPUTE_DTYPE)
        inv_norm = 1.0 / tl.maximum(norm, floor)
        projection = tl.where(norm > floor, dot * inv_norm * inv_norm * inv_norm, 0.0)
    for first_channel in range(0, n_channels, BLOCK_C):
        channels, mask = _channel_block(first_channel, n_channels, position_mask, BLOCK_C)
        signs = state_row[None, :] + channels[:, None] * n_positions
        grad = p * tl.load(signs, mask=mask, other=0).to(COMPUTE_DTYPE) + n * tl.load(
            signs + plane, mask=mask, other=0).to(COMPUTE_DTYPE)
        if NORMALIZE:
            x = _load_channel_block(x_row, channels, x_stride_c, mask, COMPUTE_DTYPE)
            grad = tl.where(active, grad * inv_norm[None, :] - x * projection[None, :], 0.0)
        tl.store(grad_row[None, :] + channels[:, None] * grad_stride_c, grad.to(grad_ptr.dtype.element_ty), mask=mask)
