"""The torch.library plumbing every fused backend shares.

A fused backend provides three plain functions (its kernels' launchers):

- ``forward(student, teacher, negatives, distance, normalize) -> (d_pos, d_neg)``:
  each (B,) in ``compute_dtype`` of the inputs;
- ``backward(grad_pos, grad_neg, student, teacher, negatives, distance, normalize,
  need_student, need_teacher, need_negatives) -> (g_student, g_teacher, g_negatives)``:
  a gradient shaped and typed like its input where asked for, an empty
  tensor where not (custom ops cannot return None);
- ``patch_mse(sr_student, sr_teacher, hr) -> (B, 2)`` in ``compute_dtype``.

:func:`define_ops` turns them into ``facd_fast::<prefix>_feature_distances``,
``facd_fast::<prefix>_feature_distances_backward`` and
``facd_fast::<prefix>_patch_mse`` custom ops with fake (meta) kernels and
autograd, so ``torch.compile(fullgraph=True)`` traces through them and
``torch.library.opcheck`` can test them. The forward keeps no extra tensor for
backward: only references to its inputs; the backward recomputes the channel
norms (one cheap pass) and sweeps the pairs again.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference import compute_dtype
from . import BackendOps


def define_ops(
    prefix: str,
    device_types: Sequence[str],
    forward: Callable[..., Tuple[Tensor, Tensor]],
    backward: Callable[..., Tuple[Tensor, Tensor, Tensor]],
    patch_mse: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> BackendOps:
    """Registers the three custom ops of one backend and returns its :class:`BackendOps`."""
    device_types = tuple(device_types)

    @torch.library.custom_op(
        f"facd_fast::{prefix}_feature_distances", mutates_args=(), device_types=device_types
    )
    def distances_op(
        student: Tensor, teacher: Tensor, negatives: Optional[Tensor], distance: str, normalize: str
    ) -> Tuple[Tensor, Tensor]:
        return forward(student, teacher, negatives, distance, normalize)

    @distances_op.register_fake
    def _(student, teacher, negatives, distance, normalize):
        batch = student.shape[0]
        dtype = compute_dtype(student.dtype)
        return student.new_empty((batch,), dtype=dtype), student.new_empty((batch,), dtype=dtype)

    @torch.library.custom_op(
        f"facd_fast::{prefix}_feature_distances_backward", mutates_args=(), device_types=device_types
    )
    def distances_backward_op(
        grad_pos: Tensor,
        grad_neg: Tensor,
        student: Tensor,
        teacher: Tensor,
        negatives: Optional[Tensor],
        distance: str,
        normalize: str,
        need_student: bool,
        need_teacher: bool,
        need_negatives: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return backward(
            grad_pos, grad_neg, student, teacher, negatives, distance, normalize,
            need_student, need_teacher, need_negatives,
        )

    @distances_backward_op.register_fake
    def _(grad_pos, grad_neg, student, teacher, negatives, distance, normalize,
          need_student, need_teacher, need_negatives):
        def grad_like(x: Optional[Tensor], needed: bool) -> Tensor:
            return torch.empty_like(x) if needed and x is not None else student.new_empty((0,))

        return grad_like(student, need_student), grad_like(teacher, need_teacher), grad_like(negatives, need_negatives)

    def setup_context(ctx, inputs, output):
        student, teacher, negatives, distance, normalize = inputs
        ctx.save_for_backward(student, teacher, negatives)
        ctx.distance = distance
        ctx.normalize = normalize

    def backward_rule(ctx, grad_pos, grad_neg):
        student, teacher, negatives = ctx.saved_tensors
        need_student, need_teacher, need_negatives = ctx.needs_input_grad[:3]
        need_negatives = need_negatives and negatives is not None
        g_student, g_teacher, g_negatives = distances_backward_op(
            grad_pos, grad_neg, student, teacher, negatives, ctx.distance, ctx.normalize,
            need_student, need_teacher, need_negatives,
        )
        return (
            g_student if need_student else None,
            g_teacher if need_teacher else None,
            g_negatives if need_negatives else None,
            None,
            None,
        )

    distances_op.register_autograd(backward_rule, setup_context=setup_context)

    @torch.library.custom_op(f"facd_fast::{prefix}_patch_mse", mutates_args=(), device_types=device_types)
    def patch_mse_op(sr_student: Tensor, sr_teacher: Tensor, hr: Tensor) -> Tensor:
        return patch_mse(sr_student, sr_teacher, hr)

    @patch_mse_op.register_fake
    def _(sr_student, sr_teacher, hr):
        return hr.new_empty((hr.shape[0], 2), dtype=compute_dtype(hr.dtype))

    return BackendOps(distances_op, patch_mse_op)
