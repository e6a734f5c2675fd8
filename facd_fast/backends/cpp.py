"""The ``cpp`` backend: the fused C++ kernels of ``csrc/`` for CPU tensors.

The extension is ``facd_fast._C`` when ``pip install`` built it; in a source
checkout without it, it is JIT-built from ``csrc/`` on first use with
``torch.utils.cpp_extension.load`` (cached under torch's extension directory;
a message says so once, the build takes a minute or two). With no working
compiler the backend is unavailable and ``backend="auto"`` falls back to the
reference with one warning.

The kernels never materialise the (B, B, C, H, W) pairwise tensor; see
``csrc/facd_kernels.h`` for the algorithm. Memory: each thread stages one
block of positions of the rows it works on (all channels, normalised, in
float32; about 3 MB per thread at the EDSR tap) and the gradients are
scattered from there straight into the outputs. The forward keeps nothing
for the backward beyond references to its inputs; the backward re-reads and
re-normalises them. Results are bitwise reproducible, whatever the number of
threads.
"""
from __future__ import annotations

import glob
import importlib
import os
import sys
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference import compute_dtype
from . import Backend, BackendOps, BackendUnavailable, register_backend
from .custom_ops import define_ops

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
JIT_NAME = "facd_fast_cpu_kernels"

_extension: Optional[ModuleType] = None


def _jit_build() -> ModuleType:
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))  # sorted: facd_cpu.cpp links first (see there)
    if not sources:
        raise BackendUnavailable(f"facd_fast._C is not built and no C++ sources were found in {CSRC}")
    sys.path.insert(0, CSRC)
    try:
        from facd_build import cxx_flags, ld_flags
    finally:
        sys.path.remove(CSRC)
    from torch.utils.cpp_extension import _get_build_directory, load

    if not os.path.exists(os.path.join(_get_build_directory(JIT_NAME, verbose=False), f"{JIT_NAME}.so")):
        print(f"facd_fast: building the C++ CPU kernels from {CSRC} (first use; this takes a minute or two)",
              file=sys.stderr, flush=True)
    try:
        return load(JIT_NAME, sources, extra_cflags=cxx_flags(), extra_ldflags=ld_flags(), verbose=False)
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, failed build, unloadable library
        raise BackendUnavailable(f"cannot build the C++ kernels: {error}") from error


def load_extension() -> ModuleType:
    """The compiled kernels module: ``facd_fast._C`` if installed, else JIT-built (once per process)."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module("facd_fast._C")
        except ImportError:
            _extension = _jit_build()
    return _extension


def forward(student: Tensor, teacher: Tensor, negatives: Optional[Tensor], distance: str,
            normalize: str) -> Tuple[Tensor, Tensor]:
    """(d_pos, d_neg), each (B,) in compute_dtype: see :func:`facd_fast.reference.feature_distances`."""
    dtype = compute_dtype(student.dtype)
    d_pos = student.new_empty((student.shape[0],), dtype=dtype)
    d_neg = student.new_empty((student.shape[0],), dtype=dtype)
    load_extension().feature_distances_out(student, teacher, negatives, distance, normalize, d_pos, d_neg)
    return d_pos, d_neg


def backward(grad_pos: Tensor, grad_neg: Tensor, student: Tensor, teacher: Tensor, negatives: Optional[Tensor],
             distance: str, normalize: str, need_student: bool, need_teacher: bool,
             need_negatives: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_pos * d_pos + grad_neg * d_neg); an empty tensor where not needed."""
    def output(x: Optional[Tensor], needed: bool) -> Optional[Tensor]:
        return torch.empty_like(x) if needed and x is not None else None

    grads = (output(student, need_student), output(teacher, need_teacher), output(negatives, need_negatives))
    load_extension().feature_distances_backward_out(
        grad_pos, grad_neg, student, teacher, negatives, distance, normalize, *grads
    )
    # One empty tensor per missing gradient: custom-op outputs may not alias each other.
    return tuple(student.new_empty((0,)) if g is None else g for g in grads)


def patch_mse(sr_student: Tensor, sr_teacher: Tensor, hr: Tensor) -> Tensor:
    """(B, 2) in compute_dtype(hr): the student's and the teacher's per-patch MSE against hr, in one pass."""
    out = hr.new_empty((hr.shape[0], 2), dtype=compute_dtype(hr.dtype))
    load_extension().patch_mse_out(sr_student, sr_teacher, hr, out)
    return out


def _load() -> BackendOps:
    load_extension()
    return define_ops("cpp", ("cpu",), forward, backward, patch_mse)


register_backend(Backend(name="cpp", device_types=("cpu",), priority=10, load=_load))
