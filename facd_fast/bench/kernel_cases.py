"""The kernel benchmark's cases and providers: what :mod:`facd_fast.bench.kernels` times.

A case is a shape, a dtype, a mode and a distance; a provider is the loss
function timed on it (see :mod:`facd_fast.bench.kernels` for each provider).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import facd_fast
from facd_fast import reference
from facd_fast.definition import contrastive_ratio

PROVIDERS = ("eager", "compile", "fused", "fitnet")
BASELINE = "fused-before"
MODES = ("forward", "forward+backward")
DISTANCES = ("l1", "l2")
#: name -> (B, C, H, W); the paper's x4 setting (HR 192, batch 16) and a batch sweep at the RCAN tap.
SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "edsr": (16, 256, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (4, 8)},
    "rcan": (16, 64, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (32, 64, 128)},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The eager reference materialises B*B*C*H*W elements (three such tensors in
#: its backward); cases above this many bytes of it are skipped and reported.
EAGER_PAIR_BYTES_LIMIT = 1 << 30


@dataclass(frozen=True)
class Case:
    shape_name: str
    shape: Tuple[int, int, int, int]
    dtype_name: str
    mode: str
    distance: str = "l1"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        return f"{self.shape_name}-{'x'.join(map(str, self.shape))}-{self.distance}-{self.dtype_name}-{self.mode}"


def cases(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES),
          modes: Sequence[str] = MODES, distances: Sequence[str] = DISTANCES) -> List[Case]:
    return [Case(s, SHAPES[s], d, m, dist) for m in modes for dist in distances for d in dtypes for s in shapes]


class _BaselineDistances(torch.autograd.Function):
    """(d_pos, d_neg) of in-batch negatives with an older build's kernels (its pybind API)."""

    @staticmethod
    def forward(ctx, student, teacher, extension, distance):
        dtype = reference.compute_dtype(student.dtype)
        d_pos = student.new_empty((student.shape[0],), dtype=dtype)
        d_neg = student.new_empty((student.shape[0],), dtype=dtype)
        extension.feature_distances_out(student, teacher, None, distance, "channel", d_pos, d_neg)
        ctx.save_for_backward(student, teacher)
        ctx.extension, ctx.distance = extension, distance
        return d_pos, d_neg

    @staticmethod
    def backward(ctx, grad_pos, grad_neg):
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        ctx.extension.feature_distances_backward_out(grad_pos.contiguous(), grad_neg.contiguous(), student, teacher,
                                                     None, ctx.distance, "channel", grad, None, None)
        return grad, None, None, None


def load_baseline(csrc: str):
    """The C++ kernels of another checkout's csrc/ folder, JIT-built as their own module (cached)."""
    import glob
    import importlib.util

    from torch.utils.cpp_extension import load

    spec = importlib.util.spec_from_file_location("baseline_facd_build", os.path.join(csrc, "facd_build.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    return load("facd_baseline_kernels", sorted(glob.glob(os.path.join(csrc, "*.cpp"))),
                extra_cflags=flags.cxx_flags(), extra_ldflags=flags.ld_flags(), verbose=False)


def loss_function(provider: str, distance: str = "l1", baseline=None, compile_backend: str = "inductor") -> Callable:
    """(student, teacher) -> scalar loss for one provider; ``baseline``: :func:`load_baseline`'s module.

    ``compile_backend``: torch.compile's backend for the ``compile`` provider
    (Inductor; ``"eager"`` traces with Dynamo alone, for a quick dry run).
    """
    if provider == "eager":
        return partial(reference.contrastive_loss, distance=distance)
    if provider == "compile":
        return partial(torch.compile(reference.contrastive_loss, backend=compile_backend), distance=distance)
    if provider == "fused":
        return partial(facd_fast.contrastive_loss, distance=distance, backend="auto")
    if provider == "fitnet":
        return F.l1_loss if distance == "l1" else F.mse_loss
    if provider == BASELINE and baseline is not None:
        def before(student, teacher):
            d_pos, d_neg = _BaselineDistances.apply(student, teacher, baseline, distance)
            return contrastive_ratio(d_pos, d_neg, None, 1e-6, "mean").to(student.dtype)
        return before
    raise ValueError(f"provider must be one of {PROVIDERS} (or {BASELINE} with a baseline), got {provider!r}")


def eager_too_large(case: Case) -> bool:
    b, c, h, w = case.shape
    return b * b * c * h * w * torch.finfo(case.dtype).bits // 8 > EAGER_PAIR_BYTES_LIMIT


def make_inputs(case: Case, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    teacher = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    return student.requires_grad_(case.mode == "forward+backward"), teacher


def step_function(loss_fn: Callable, case: Case, student, teacher) -> Callable[[], None]:
    """One timed call: the loss, and its backward to the student in forward+backward."""
    if case.mode == "forward":
        def step():
            with torch.no_grad():
                loss_fn(student, teacher)
    else:
        def step():
            loss_fn(student, teacher).backward()
            student.grad = None
    return step
