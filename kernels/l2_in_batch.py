"""Triton kernels of l2 with in-batch negatives in closed form: no pairs, forward or backward.

Each program holds every row of its positions and uses the per-element
teacher mean m,
sum_{k != i} (a - t_k)^2 = B (a - m)^2 + sum_k (t_k - m)^2 - (a - t_i)^2
(``_l2_in_batch_sums_kernel``, ``_l2_in_batch_gradient_kernel``). A
program's tile is a span (:mod:`facd_fast.kernels.feature_rows`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .feature_rows import _inverse_norm_tile, _load_channel, _row_pointers, _span


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
