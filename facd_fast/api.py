"""The public functions: ``contrastive_loss``, ``adaptive_mask``, ``patch_mse``.

They check their inputs, pick a backend, let it compute the per-patch
distances or errors, and finish with the O(B) ratio, mask and reduction of
:mod:`facd_fast.definition`. A backend is ``reference`` (the plain-PyTorch
oracle, :mod:`facd_fast.reference`) or a kernel set of the ``facd_fast`` ops
(:mod:`facd_fast.ops`): ``cpp`` for CPU tensors, ``triton`` for CUDA ones,
both called through PyTorch's dispatcher, which picks the kernel by device.
``auto`` is the kernel set of the inputs' device, or ``FACD_BACKEND`` when
that is set; where no kernel set runs, it falls back to the reference with
one warning.

NaN or Inf in the features propagate to the result, as in torch's losses;
a NaN on a masked-out patch is dropped with the patch, and the patch's student
feature gets exactly zero gradient whatever it holds (its teacher feature
still serves as a negative for the other patches).
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from .checks import check_choice, check_real
from .definition import compute_dtype, contrastive_ratio, keeps_sign_state, mask_from_mse

DISTANCES = ("l1", "l2")
NORMALIZATIONS = ("channel", "none")
REDUCTIONS = ("mean", "sum", "none")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_dense(name: str, x: Tensor) -> None:
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a tensor without data); move it to the features' device")


def _check_feature(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    _check_dense(name, x)


def _check_same_device(named: dict) -> None:
    devices = {name: x.device for name, x in named.items() if x is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs must be on one device, got {listed}")


def _check_mask(mask, batch: int, device: torch.device) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape ({batch},) or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"mask must be a bool or real tensor of 0 and 1, got {mask.dtype}")
    _check_dense("mask", mask)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},) (one value per patch), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the features' device {device}, got {mask.device}")
    if mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (or be a bool tensor)")


#: Every backend name: ``auto``, the oracle, the ops' kernel sets.
BACKENDS = ("auto", "reference", ops.CPP, ops.TRITON)
#: Names ``auto`` for every call when set.
ENV_VAR = "FACD_BACKEND"


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


_warned_fallback: set = set()


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend that runs for tensors of ``device_type``: "reference", "cpp" or "triton".

    ``backend`` is a name of :data:`BACKENDS`, already checked. An explicit
    kernel set that cannot run here, or not on this device, is an error;
    ``auto`` falls back to the reference with one warning.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is not a backend; expected one of {list(BACKENDS)}")
    if backend == "reference":
        return backend
    if backend != "auto":
        if device_type not in ops.device_types(backend):
            raise ValueError(
                f"backend={backend!r} runs on {', '.join(ops.device_types(backend))} tensors, "
                f"but the inputs are on {device_type}"
            )
        ops.check_available(backend)
        return backend
    kernels = ops.KERNELS_BY_DEVICE.get(device_type)
    reason = f"no facd_fast kernels for {device_type} tensors" if kernels is None else ops.UNAVAILABLE.get(kernels)
    if reason is None:
        return kernels
    if device_type not in _warned_fallback:
        _warned_fallback.add(device_type)
        warnings.warn(f"{reason}; falling back to the slower reference", RuntimeWarning, stacklevel=3)
    return "reference"


def available_backends() -> List[str]:
    """The backends that run on this machine, for some device."""
    return ["reference", *(name for name in (ops.CPP, ops.TRITON) if name not in ops.UNAVAILABLE)]


def feature_distances(student, teacher, negatives, distance, normalize, backend="auto",
                      mask=None) -> Tuple[Tensor, Tensor]:
    """(d_pos, d_neg), each (B,) in compute_dtype, from the backend that runs for the inputs' device.

    The distances :func:`contrastive_loss` is made of (see
    :func:`facd_fast.reference.feature_distances`), for inputs it has checked.
    ``mask``: the loss's mask, if any; the reference then never reads a
    masked-out student (the kernels skip a patch whose upstream gradients are 0).
    """
    name = resolve_backend(backend, student.device.type)
    if name == "reference":
        if mask is not None:
            student = reference.drop_masked_students(student, mask)
        dtype = compute_dtype(student.dtype)
        return reference.feature_distances(
            student.to(dtype), teacher.to(dtype), None if negatives is None else negatives.to(dtype),
            distance, normalize,
        )
    ops.use_kernels(name, student.device.type)
    # the sign sums of l1's one-pass student backward, only when that backward will run
    keep_state = keeps_sign_state(negatives, distance) and torch.is_grad_enabled() and student.requires_grad
    d_pos, d_neg, _ = torch.ops.facd_fast.feature_distances(student, teacher, negatives, distance, normalize,
                                                            keep_state)
    return d_pos, d_neg


def contrastive_loss(
    student: Tensor,
    teacher: Tensor,
    negatives: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    distance: str = "l1",
    normalize: str = "channel",
    eps: float = 1e-6,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Feature-domain contrastive loss of one tap.

    Args:
        student: (B, C, H, W) float16/bfloat16/float32/float64, the student
            feature after its DR adapter.
        teacher: (B, C, H, W), same dtype and device: the positives.
        negatives: (B, K, C, H, W) explicit negatives, ``negatives[i]`` for
            patch i; None (default) uses in-batch negatives, the teacher
            features of every other patch (needs B >= 2).
        mask: (B,) of 0/1 (bool or numeric) or None; patches with 0 add
            nothing, and their student features get exactly zero gradient
            whatever they hold (their teacher features still serve as
            negatives for the other patches). The mask gets no gradient.
        distance: ``"l1"`` (mean absolute difference) or ``"l2"`` (mean
            squared difference) over C*H*W.
        normalize: ``"channel"`` divides each position's C-vector by its L2
            norm (floored at 1e-6); ``"none"`` compares raw features.
        eps: > 0, added to the negative distance in the ratio.
        reduction: ``"mean"`` (sum of masked ratios / B), ``"sum"`` or
            ``"none"`` (the (B,) masked ratios).
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` (CPU tensors) or
            ``"triton"`` (CUDA tensors); see :func:`facd_fast.available_backends`.

    Returns:
        A scalar, or (B,) for ``reduction="none"``, in the inputs' dtype
        (computed in float32 for half inputs).
    """
    _check_feature("student", student)
    _check_feature("teacher", teacher)
    if student.dim() != 4:
        raise ValueError(f"student must have shape (B, C, H, W), got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
    if student.numel() == 0:
        raise ValueError(f"student must not be empty, got shape {tuple(student.shape)}")
    batch = student.shape[0]
    if negatives is None:
        if batch < 2:
            raise ValueError(
                f"in-batch negatives need a batch of at least 2 patches, got B={batch}; "
                "pass explicit negatives or a larger batch"
            )
    else:
        _check_feature("negatives", negatives)
        if negatives.dtype != student.dtype:
            raise TypeError(f"negatives must have the student's dtype {student.dtype}, got {negatives.dtype}")
        if negatives.dim() != 5:
            raise ValueError(f"negatives must have shape (B, K, C, H, W), got {tuple(negatives.shape)}")
        if negatives.shape[0] != batch or negatives.shape[2:] != student.shape[1:]:
            raise ValueError(
                f"negatives must have shape ({batch}, K, {', '.join(map(str, student.shape[1:]))}) "
                f"to match student {tuple(student.shape)}, got {tuple(negatives.shape)}"
            )
        if negatives.shape[1] == 0:
            raise ValueError("negatives must hold at least one negative per patch (K >= 1), got K=0")
    _check_same_device({"student": student, "teacher": teacher, "negatives": negatives})
    if mask is not None:
        _check_mask(mask, batch, student.device)
    check_choice("distance", distance, DISTANCES)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_real("eps", eps, 0.0, least_inclusive=False)
    _check_backend(backend)

    d_pos, d_neg = feature_distances(student, teacher, negatives, distance, normalize, backend, mask)
    return contrastive_ratio(d_pos, d_neg, mask, eps, reduction).to(student.dtype)


def _check_images(sr_student, sr_teacher, hr) -> None:
    named = {"sr_student": sr_student, "sr_teacher": sr_teacher, "hr": hr}
    for name, x in named.items():
        _check_feature(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape != hr.shape:
            raise ValueError(f"{name} must have hr's shape {tuple(hr.shape)}, got {tuple(x.shape)}")
    if hr.numel() == 0:
        raise ValueError(f"hr must not be empty, got shape {tuple(hr.shape)}")
    _check_same_device(named)


def patch_mse(sr_student: Tensor, sr_teacher: Tensor, hr: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-patch mean squared errors in one pass: (B, 2) float32 (float64 for float64 hr).

    Column 0 is the student's MSE against hr, column 1 the teacher's; no gradient.
    """
    _check_images(sr_student, sr_teacher, hr)
    _check_backend(backend)
    name = resolve_backend(backend, hr.device.type)
    with torch.no_grad():
        if name == "reference":
            return reference.patch_mse(sr_student, sr_teacher, hr)
        ops.use_kernels(name, hr.device.type)
        return torch.ops.facd_fast.patch_mse(sr_student, sr_teacher, hr)


def adaptive_mask(
    sr_student: Tensor,
    sr_teacher: Tensor,
    hr: Tensor,
    *,
    margin_db: float = 0.0,
    data_range: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Which patches to distil on: bool (B,), True where the teacher's PSNR beats the student's by more than margin_db.

    Args:
        sr_student, sr_teacher, hr: (B, 3, H, W) float, values in [0, data_range].
        margin_db: the PSNR lead, in dB, the teacher needs on a patch.
        data_range: the images' peak value, > 0. A PSNR difference does not
            depend on it (it cancels); it is checked so that a wrong scale
            is caught where the protocol is set.
    """
    _check_images(sr_student, sr_teacher, hr)
    check_real("margin_db", margin_db)
    check_real("data_range", data_range, 0.0, least_inclusive=False)
    return mask_from_mse(patch_mse(sr_student, sr_teacher, hr, backend=backend), margin_db)
