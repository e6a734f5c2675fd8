"""The ``triton`` backend: the fused Triton kernels of :mod:`facd_fast.kernels` for CUDA tensors.

Registered as the ``facd_fast::triton_*`` custom ops (:func:`define_ops`), so
autograd, ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``
see through it. Under ``TRITON_INTERPRET=1`` (set before this module is
imported) Triton emulates the kernels on CPU tensors, which is how the tests
run them without a GPU. The emulator runs at Python speed, so then the
backend also serves CPU tensors but with the lowest priority: ``auto`` never
picks it over the reference; only ``backend="triton"`` does.
"""
from __future__ import annotations

import os

from . import Backend, BackendOps, BackendUnavailable, register_backend

#: True when Triton emulates its kernels on the CPU instead of compiling them.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)


def _load() -> BackendOps:
    # Absolute imports: this module's own name does not shadow the triton package.
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(f"triton cannot be imported ({error}); pip install 'facd-fast[triton]'") from error
    from ..kernels.contrastive import feature_distances_backward, feature_distances_forward
    from ..kernels.patch_mse import patch_mse
    from .custom_ops import define_ops

    return define_ops("triton", DEVICE_TYPES, feature_distances_forward, feature_distances_backward, patch_mse)


register_backend(
    Backend(
        name="triton",
        device_types=DEVICE_TYPES,
        # The fused backend on CUDA (below cpp's 10, which serves only CPU tensors);
        # interpreted, below the reference's 0.
        priority=-1 if INTERPRETED else 5,
        load=_load,
    )
)
