"""What the Triton kernels of facd_fast share: element addressing, dtypes, launch sizes.

A feature row is one patch's (C, H, W) block. Kernels index it by channel
and flat spatial position p = h * W + w (or flat element e = c * H * W + p),
but address memory with the tensor's own strides, so any layout
(contiguous, channels_last, sliced, expanded) is read in place without a copy.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: Programs per streaming multiprocessor that a reduction over elements aims for.
_PROGRAMS_PER_SM = 4
#: Programs a reduction aims for where there is no GPU (the interpreter); more than
#: one, so that the fixed-order sum of per-program partials is always exercised.
_INTERPRETER_PROGRAMS = 2


@triton.jit
def element_offsets(elements, n_positions, width, stride_c, stride_h, stride_w):
    """Memory offsets, within a row, of flat element indices e = c * n_positions + p (any shape)."""
    channel = elements // n_positions
    position = elements % n_positions
    return channel * stride_c + (position // width) * stride_h + (position % width) * stride_w


def tl_compute_dtype(dtype: torch.dtype):
    """The Triton dtype kernels accumulate in: float64 for float64 inputs, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def target_programs(device: torch.device) -> int:
    """How many programs a reduction kernel should spread its work over on ``device``."""
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def split_evenly(n_items: int, n_parts: int):
    """Splits ``n_items`` into about ``n_parts`` runs of equal length (the last may be shorter).

    Returns ``(n_runs, items_per_run)``: run j covers items
    [j * items_per_run, min((j + 1) * items_per_run, n_items)).
    """
    items_per_run = triton.cdiv(n_items, max(1, min(n_parts, n_items)))
    return triton.cdiv(n_items, items_per_run), items_per_run


def on_device(tensor: torch.Tensor):
    """Makes the tensor's GPU the current one while kernels launch (Triton launches there)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
