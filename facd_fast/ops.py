"""The facd_fast ops: their kernels per device, fake kernels and autograd, registered once.

The three ops and their schemas are declared in C++ (csrc/facd_ops.cpp)::

    facd_fast::feature_distances(student, teacher, negatives?, distance, normalize) -> (d_pos, d_neg, saved)
    facd_fast::feature_distances_backward(grad_pos, grad_neg, student, teacher, negatives?, saved,
                                          distance, normalize, output_mask) -> (g_student, g_teacher, g_negatives)
    facd_fast::patch_mse(sr_student, sr_teacher, hr) -> (B, 2)

PyTorch's dispatcher picks the kernel by the tensors' device:

- CPU: the C++ kernels of csrc/facd_cpu.cpp (``TORCH_LIBRARY_IMPL(facd_fast, CPU, m)``),
  in the ``facd_fast._C`` library loaded below (or JIT-built from the C++ sources, :data:`CSRC`);
- CUDA: the Triton launchers of :mod:`facd_fast.kernels`, registered here.
  ``torch.library.triton_op`` would define a new op from the Python
  signature; the schema lives in C++, so this module registers them the
  way ``triton_op`` does: the launcher as the CUDA kernel (launching with
  ``wrap_triton`` enabled only while tracing), and a decomposition into it
  under ``FunctionalTensorMode``, so that ``torch.compile`` (AOTAutograd,
  Inductor) sees the Triton kernels themselves.

Here too: the fake (meta) kernels and the autograd formula of
``feature_distances`` (its backward is the ``feature_distances_backward`` op,
whatever the device). ``saved`` is what a forward kernel keeps for its
backward: with ``keep_state`` (the caller will ask for the student's
gradient), l1 and in-batch negatives, the per-element sign sums that make the
student's backward one elementwise pass ((2, B, C, H, W) int8 for B <= 128:
2 bytes per student element, on both devices); an empty tensor otherwise
(l2 in-batch runs in closed form and keeps nothing).

The extension carries the schemas: when it cannot be loaded (no compiler for
a source checkout) there are no ops, and :mod:`facd_fast.api` falls back to
the reference with a warning.

Under ``TRITON_INTERPRET=1`` (tests without a GPU) Triton emulates its kernels
on CPU tensors; :func:`use_kernels` then lets ``backend="triton"`` put the
launchers in place of the C++ kernels for CPU tensors.
"""
from __future__ import annotations

import importlib
import os
import runpy
import sys
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .definition import compute_dtype, keeps_sign_state, sign_state_dtype

#: The fused kernel sets, by the device types whose tensors they serve.
CPP, TRITON = "cpp", "triton"
#: True when Triton emulates its kernels on the CPU instead of compiling them.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: The kernel set PyTorch's dispatcher runs for each device type.
KERNELS_BY_DEVICE = {"cpu": CPP, "cuda": TRITON}
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_INSTALLED_CSRC = os.path.join(_PACKAGE, "csrc")
#: The JIT build's sources: the copy of csrc/ an installed package carries (facd_fast/csrc/, see
#: setup.py), else csrc/ next to the package in a source checkout.
CSRC = _INSTALLED_CSRC if os.path.isdir(_INSTALLED_CSRC) else os.path.join(os.path.dirname(_PACKAGE), "csrc")
JIT_NAME = "facd_fast_cpu_kernels"


class KernelsUnavailable(RuntimeError):
    """A kernel set cannot run here (no extension, no triton, wrong device...)."""


def _jit_build() -> None:
    if not os.path.exists(os.path.join(CSRC, "facd_build.py")):
        raise KernelsUnavailable(f"facd_fast._C is not built and no C++ sources were found in {CSRC}")
    build = runpy.run_path(os.path.join(CSRC, "facd_build.py"))
    from torch.utils.cpp_extension import _get_build_directory, load

    if not os.path.exists(os.path.join(_get_build_directory(JIT_NAME, verbose=False), f"{JIT_NAME}.so")):
        print(f"facd_fast: building the C++ CPU kernels from {CSRC} (first use; this takes a minute or two)",
              file=sys.stderr, flush=True)
    try:
        load(JIT_NAME, build["sources"](), extra_cflags=build["cxx_flags"](), extra_ldflags=build["ld_flags"](),
             is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, failed build, unloadable library
        raise KernelsUnavailable(f"cannot build the C++ kernels: {error}") from error


def _ops_loaded() -> bool:
    return hasattr(torch.ops.facd_fast, "feature_distances")


def load_library() -> None:
    """Loads the ops' schemas and CPU kernels: ``facd_fast._C`` if installed, else a JIT build of csrc/."""
    if _ops_loaded():
        return
    try:
        importlib.import_module("facd_fast._C")
    except ImportError:
        _jit_build()


def _nothing_saved(like: Tensor) -> Tensor:
    """The ``saved`` output of a forward kernel that keeps nothing for its backward."""
    return like.new_empty((0,), dtype=torch.int8)


def _saved_fake(student, negatives, distance, keep_state) -> Tensor:
    """``saved`` of the forward kernels (C++ and Triton alike): with keep_state, l1 and in-batch negatives, the
    (2, B, C, H, W) per-element sign sums (``sign_state_dtype(B)``); else nothing."""
    if keep_state and keeps_sign_state(negatives, distance):
        return student.new_empty((2, *student.shape), dtype=sign_state_dtype(student.shape[0]))
    return _nothing_saved(student)


def _feature_distances_fake(student, teacher, negatives, distance, normalize, keep_state=False):
    batch = student.shape[0]
    dtype = compute_dtype(student.dtype)
    return (student.new_empty((batch,), dtype=dtype), student.new_empty((batch,), dtype=dtype),
            _saved_fake(student, negatives, distance, keep_state))


def _feature_distances_backward_fake(grad_pos, grad_neg, student, teacher, negatives, saved, distance, normalize,
                                     output_mask):
    inputs = (student, teacher, negatives)
    return tuple(
        torch.empty_like(x) if needed and x is not None else student.new_empty((0,))
        for x, needed in zip(inputs, output_mask)
    )


def _patch_mse_fake(sr_student, sr_teacher, hr):
    return hr.new_empty((hr.shape[0], 2), dtype=compute_dtype(hr.dtype))


def _setup_context(ctx, inputs, output):
    student, teacher, negatives, distance, normalize = inputs[:5]
    saved = output[2]
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(student, teacher, negatives, saved)
    ctx.distance = distance
    ctx.normalize = normalize


def _feature_distances_backward(ctx, grad_pos, grad_neg, _grad_saved):
    student, teacher, negatives, saved = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and negatives is not None]
    grads = torch.ops.facd_fast.feature_distances_backward(
        grad_pos, grad_neg, student, teacher, negatives, saved, ctx.distance, ctx.normalize, output_mask
    )
    return (*(g if needed else None for g, needed in zip(grads, output_mask)), None, None, None)


def _register_fake_and_autograd() -> None:
    torch.library.register_fake("facd_fast::feature_distances", _feature_distances_fake)
    torch.library.register_fake("facd_fast::feature_distances_backward", _feature_distances_backward_fake)
    torch.library.register_fake("facd_fast::patch_mse", _patch_mse_fake)
    torch.library.register_autograd(
        "facd_fast::feature_distances", _feature_distances_backward, setup_context=_setup_context
    )


def _triton_launchers() -> Dict[str, Callable]:
    """op name -> Triton launcher (``facd_fast.kernels``); raises ImportError without triton."""
    from .kernels.contrastive import feature_distances_backward, feature_distances_forward
    from .kernels.patch_mse import patch_mse

    return {
        "feature_distances": feature_distances_forward,
        "feature_distances_backward": feature_distances_backward,
        "patch_mse": patch_mse,
    }


def _eager_launch(launcher: Callable) -> Callable:
    def kernel(*args):
        # Plain tensors: launch the Triton kernels directly rather than through
        # wrap_triton's higher-order op (as torch.library.triton_op does).
        from torch._library.triton import set_wrap_triton_enabled

        with set_wrap_triton_enabled(False):
            return launcher(*args)

    return kernel


def _decompose_on_cuda(launcher: Callable) -> Callable:
    """The FunctionalTensorMode rule of torch.library.triton_op, for CUDA tensors only.

    While AOTAutograd traces (torch.compile), a CUDA call of the op is replaced
    by its launcher, whose ``wrap_triton`` launches become nodes Inductor
    compiles; CPU calls (the C++ kernels, or the interpreter) stay opaque op calls.
    """

    def functional_decomposition(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled
        from torch._subclasses import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        on_cuda = any(isinstance(x, Tensor) and x.device.type == "cuda" for x in args)
        if not on_cuda or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not Tensor for t in types):
            return NotImplemented
        with mode:
            return launcher(*args, **kwargs)

    return functional_decomposition


def _register_triton_kernels() -> None:
    """The Triton launchers as the ops' CUDA kernels; raises ImportError without triton."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for name, launcher in _triton_launchers().items():
        qualname = f"facd_fast::{name}"
        torch.library.register_kernel(qualname, "cuda", _eager_launch(launcher))
        torch.library.register_torch_dispatch(qualname, FunctionalTensorMode, _decompose_on_cuda(launcher))


#: Why a kernel set cannot run here (absent: it can).
UNAVAILABLE: Dict[str, str] = {}


def _register() -> None:
    try:
        load_library()
    except KernelsUnavailable as error:
        UNAVAILABLE[CPP] = UNAVAILABLE[TRITON] = f"the facd_fast ops are unavailable: {error}"
        return
    _register_fake_and_autograd()
    try:
        _register_triton_kernels()
    except ImportError as error:
        UNAVAILABLE[TRITON] = f"triton cannot be imported ({error}); pip install 'facd-fast[triton]'"


_register()


def device_types(kernels: str) -> Tuple[str, ...]:
    """The device types whose tensors a kernel set serves: ("cpu",) or ("cuda",), plus "cpu" for interpreted Triton."""
    if kernels == TRITON and INTERPRETED:
        return ("cuda", "cpu")
    return tuple(device for device, name in KERNELS_BY_DEVICE.items() if name == kernels)


def check_available(kernels: str) -> None:
    """Raises :class:`KernelsUnavailable` with the reason if ``kernels`` cannot run here."""
    if kernels in UNAVAILABLE:
        raise KernelsUnavailable(UNAVAILABLE[kernels])


#: The torch.library fragment that has put the interpreted Triton launchers in
#: place of the C++ kernels for CPU tensors; None while the C++ kernels serve them.
_triton_on_cpu: Optional[torch.library.Library] = None


def use_kernels(kernels: str, device_type: str) -> None:
    """Makes ``kernels`` serve tensors of ``device_type`` (already checked to be one it serves).

    Only interpreted Triton on CPU tensors changes anything: the launchers are
    registered for the CPU key over the C++ kernels, until a call asks for the
    C++ kernels again. A registration is process-wide: the backward of a call
    runs with the CPU kernels registered when it runs.
    """
    global _triton_on_cpu
    if device_type != "cpu" or (kernels == TRITON) == (_triton_on_cpu is not None):
        return
    if kernels == CPP:
        _triton_on_cpu = None  # dropping the fragment unregisters its kernels: the C++ ones serve again
        return
    fragment = torch.library.Library("facd_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name, launcher in _triton_launchers().items():
            fragment.impl(name, _eager_launch(launcher), "CPU")
    _triton_on_cpu = fragment


def cpu_capability() -> str:
    """The instruction set the C++ kernels run with: "DEFAULT", "AVX2" or "AVX512"."""
    return torch.ops.facd_fast.cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Forces the C++ kernels' instruction set: "default", "avx2", "avx512", or "auto" (the best); tests, benchmarks."""
    torch.ops.facd_fast.set_cpu_capability(name)
