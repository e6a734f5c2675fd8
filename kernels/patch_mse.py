"""Triton kernel of the adaptive mask's statistics: per-patch MSE of the student and the teacher.

The CUDA kernel of the ``facd_fast::patch_mse`` op (schema in csrc/facd_ops.cpp,
registered in :mod:`facd_fast.ops`).

One pass over sr_student, sr_teacher and hr: each program sums both squared
errors over a span of one patch's elements and writes the two partial sums;
the spans are summed in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from facd_fast.definition import compute_dtype

from .utils import element_offsets, on_device, split_evenly, target_programs, tl_compute_dtype

_ELEMENT_BLOCK = 1024


@triton.jit
def _patch_squared_error_sums_kernel(
    sr_student_ptr, sr_teacher_ptr, hr_ptr, sums_ptr,
    student_stride_b, student_stride_c, student_stride_h, student_stride_w,
    teacher_stride_b, teacher_stride_c, teacher_stride_h, teacher_stride_w,
    hr_stride_b, hr_stride_c, hr_stride_h, hr_stride_w,
    n_patches, n_positions, width, n_elements, blocks_per_span,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """sums[span, b] = (sum of (sr_student - hr)^2, sum of (sr_teacher - hr)^2) over one span of patch b."""
    pid_span = tl.program_id(0).to(tl.int64)
    patch = tl.program_id(1).to(tl.int64)
    first_element = pid_span * blocks_per_span * BLOCK_E
    student_acc = tl.zeros([BLOCK_E], dtype=COMPUTE_DTYPE)
    teacher_acc = tl.zeros([BLOCK_E], dtype=COMPUTE_DTYPE)
    for block in range(blocks_per_span):
        elements = first_element + block * BLOCK_E + tl.arange(0, BLOCK_E)
        mask = elements < n_elements
        hr = tl.load(
            hr_ptr + patch * hr_stride_b
            + element_offsets(elements, n_positions, width, hr_stride_c, hr_stride_h, hr_stride_w),
            mask=mask, other=0.0,
        ).to(COMPUTE_DTYPE)
        sr_student = tl.load(
            sr_student_ptr + patch * student_stride_b
            + element_offsets(elements, n_positions, width, student_stride_c, student_stride_h, student_stride_w),
            mask=mask, other=0.0,
        ).to(COMPUTE_DTYPE)
        sr_teacher = tl.load(
            sr_teacher_ptr + patch * teacher_stride_b
            + element_offsets(elements, n_positions, width, teacher_stride_c, teacher_stride_h, teacher_stride_w),
            mask=mask, other=0.0,
        ).to(COMPUTE_DTYPE)
        student_acc += (sr_student - hr) * (sr_student - hr)
        teacher_acc += (sr_teacher - hr) * (sr_teacher - hr)
    out = sums_ptr + (pid_span * n_patches + patch) * 2
    tl.store(out, tl.sum(student_acc, axis=0))
    tl.store(out + 1, tl.sum(teacher_acc, axis=0))


def patch_mse(sr_student: Tensor, sr_teacher: Tensor, hr: Tensor) -> Tensor:
    """(B, 2) in ``compute_dtype(hr.dtype)``: per-patch MSE of sr_student and of sr_teacher against hr.

    sr_student, sr_teacher, hr: (B, C, H, W) on one device, any strides, any
    floating dtypes (each cast to the compute dtype on load).
    """
    batch, channels, height, width = hr.shape
    n_positions = height * width
    n_elements = channels * n_positions
    n_spans, blocks_per_span = split_evenly(
        triton.cdiv(n_elements, _ELEMENT_BLOCK), triton.cdiv(target_programs(hr.device), batch)
    )
    dtype = compute_dtype(hr.dtype)
    sums = torch.empty((n_spans, batch, 2), dtype=dtype, device=hr.device)
    with on_device(hr):
        wrap_triton(_patch_squared_error_sums_kernel)[(n_spans, batch)](
            sr_student, sr_teacher, hr, sums,
            *sr_student.stride(), *sr_teacher.stride(), *hr.stride(),
            batch, n_positions, width, n_elements, blocks_per_span,
            COMPUTE_DTYPE=tl_compute_dtype(hr.dtype), BLOCK_E=_ELEMENT_BLOCK,
        )
    return sums.sum(dim=0) / n_elements
