"""Backend registry: which implementation computes FACD for a given tensor.

A backend supplies two operations behind one contract (see :class:`BackendOps`):

- ``feature_distances(student, teacher, negatives, distance, normalize)`` ->
  ``(d_pos, d_neg)``, each (B,) in :func:`facd_fast.reference.compute_dtype`
  of the inputs, differentiable with respect to every floating input;
- ``patch_mse(sr_student, sr_teacher, hr)`` -> (B, 2) in ``compute_dtype``,
  the student's and teacher's per-patch mean squared error, without gradient.

Everything else in the loss (the ratio, the mask, the reduction) is O(B)
PyTorch code shared by all backends in :mod:`facd_fast.api`.

Backends: ``reference`` (always there, any device), ``cpp`` (fused C++ for
CPU tensors) and ``triton`` (fused Triton for CUDA tensors), the last two
registered by their own modules and loaded on first use. ``auto`` picks the
available backend with the highest priority for the tensor's device, after
the ``FACD_BACKEND`` environment variable if that is set.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import reference

ENV_VAR = "FACD_BACKEND"


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (no compiler, no triton, wrong device...)."""


class BackendOps(NamedTuple):
    feature_distances: Callable[[Tensor, Tensor, Optional[Tensor], str, str], Tuple[Tensor, Tensor]]
    patch_mse: Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    #: Device types served, e.g. ("cpu",); ``None`` means every device.
    device_types: Optional[Tuple[str, ...]]
    #: ``auto`` prefers higher priorities.
    priority: int
    #: Returns the ops or raises :class:`BackendUnavailable`; called once.
    load: Callable[[], BackendOps]

    def serves(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types


_REGISTRY: Dict[str, Backend] = {}
_LOADED: Dict[str, BackendOps] = {}
_FAILED: Dict[str, str] = {}
#: Modules that register a fused backend when imported.
_FUSED_MODULES = ("facd_fast.backends.cpp", "facd_fast.backends.triton")


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _reference_feature_distances(student, teacher, negatives, distance, normalize):
    dtype = reference.compute_dtype(student.dtype)
    return reference.feature_distances(
        student.to(dtype),
        teacher.to(dtype),
        None if negatives is None else negatives.to(dtype),
        distance,
        normalize,
    )


register_backend(
    Backend(
        name="reference",
        device_types=None,
        priority=0,
        load=lambda: BackendOps(_reference_feature_distances, reference.patch_mse),
    )
)


_fused_modules_imported = False


def _import_fused_modules() -> None:
    # Once: the API calls this on every call, also under torch.compile, where
    # Dynamo cannot trace importlib (a flag check it can).
    global _fused_modules_imported
    if _fused_modules_imported:
        return
    _fused_modules_imported = True
    for module in _FUSED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the module is not part of this build; its backend is simply absent


def backend_names() -> List[str]:
    """Every backend name this build knows, available here or not, plus ``auto``."""
    _import_fused_modules()
    return ["auto", *sorted(_REGISTRY)]


def _load(name: str) -> BackendOps:
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED:
        raise BackendUnavailable(_FAILED[name])
    try:
        ops = _REGISTRY[name].load()
    except BackendUnavailable as error:
        _FAILED[name] = f"backend {name!r} is unavailable: {error}"
        raise BackendUnavailable(_FAILED[name]) from error
    _LOADED[name] = ops
    return ops


def available_backends() -> List[str]:
    """Names of the backends that load on this machine (loading them if needed)."""
    _import_fused_modules()
    names = []
    for name in sorted(_REGISTRY):
        try:
            _load(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


_warned_fallback: set = set()


@torch.compiler.assume_constant_result
def resolve_name(backend: str, device_type: str) -> str:
    """The name of the backend that will run for tensors of ``device_type``, loading it if needed.

    ``backend`` is a name from :func:`backend_names`; already validated.
    Under ``torch.compile`` this runs once, eagerly, while tracing (loading a
    backend builds an extension and registers custom ops, which cannot be
    traced), and its answer is a constant of the compiled graph.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if backend != "auto" and backend not in _REGISTRY:
            raise ValueError(
                f"{ENV_VAR}={backend!r} is not a backend; expected one of {backend_names()}"
            )
    if backend != "auto":
        chosen = _REGISTRY[backend]
        if not chosen.serves(device_type):
            raise ValueError(
                f"backend={backend!r} runs on {', '.join(chosen.device_types)} tensors, "
                f"but the inputs are on {device_type}"
            )
        _load(backend)
        return backend
    candidates = sorted(
        (b for b in _REGISTRY.values() if b.serves(device_type)),
        key=lambda b: -b.priority,
    )
    for candidate in candidates:
        try:
            _load(candidate.name)
            return candidate.name
        except BackendUnavailable as error:
            if candidate.name not in _warned_fallback:
                _warned_fallback.add(candidate.name)
                warnings.warn(f"{error}; falling back to a slower backend", RuntimeWarning, stacklevel=4)
    raise AssertionError("the reference backend serves every device")  # unreachable


def resolve(backend: str, device: torch.device) -> Tuple[str, BackendOps]:
    """The backend that will run for a tensor on ``device``: ``(name, ops)``."""
    name = resolve_name(backend, device.type)
    return name, _LOADED[name]


# Registered at import (cheap: a fused backend loads its kernels on first use).
_import_fused_modules()
