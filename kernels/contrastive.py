"""Triton kernels of the FACD feature distances: forward and backward for every option (the host launchers).

The CUDA kernels of the ``facd_fast::feature_distances`` ops (schemas in
csrc/facd_ops.cpp, registered in :mod:`facd_fast.ops`): ``feature_distances_forward``
gives ``(d_pos, d_neg, saved)`` and ``feature_distances_backward`` the gradients
of ``sum(grad_pos * d_pos + grad_neg * d_neg)``; the ratio, mask and reduction
are O(B) PyTorch in :mod:`facd_fast.definition`. Kernels launch through
``torch.library.wrap_triton`` so that torch.compile traces into them.

The kernels: :mod:`.feature_rows` (addressing tiles of feature rows, channel
norms and their backward), :mod:`.pairs` (the pair sweeps: distance sums,
their gradient, l1's in-batch student gradient), :mod:`.l2_in_batch` (l2
with in-batch negatives in closed form); their block sizes: :mod:`.tiling`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from facd_fast.definition import EPS_NORM, compute_dtype, sign_state_dtype

from .feature_rows import _channel_inverse_norms_kernel, _channel_normalize_backward_kernel
from .l2_in_batch import _l2_in_batch_gradient_kernel, _l2_in_batch_sums_kernel
from .pairs import _l1_student_gradient_kernel, _pair_distance_sums_kernel, _pair_gradient_kernel
from .tiling import _channel_blocks, _in_batch_blocks, _pair_blocks, _spans
from .utils import on_device, tl_compute_dtype


def _rows_view(x: Tensor) -> Tensor:
    """x as (outer, inner, C, H, W): a (B, C, H, W) feature gets inner = 1 (a view, no copy)."""
    return x.unsqueeze(1) if x.dim() == 4 else x


def _flags(x: Tensor, distance: str, normalize: str) -> dict:
    """The pair kernels' constexpr flags and compile options for inputs like x."""
    return dict(
        COMPUTE_DTYPE=tl_compute_dtype(x.dtype),
        DISTANCE_L1=distance == "l1",
        NORMALIZE=normalize == "channel",
        # l1 takes sign(a_hat - o_hat) with sign(0) = 0: a fused multiply-add of the
        # normalisation into the difference would turn an exact tie into a rounding
        # residue of either sign. l1 has no multiply-add per pair to lose; l2 keeps fusion.
        enable_fp_fusion=distance != "l1",
    )


def _inverse_norms(x: Tensor, normalize: str) -> Tensor:
    """:func:`channel_inverse_norms` of x, or, without normalisation, an unread one-element placeholder of its shape."""
    if normalize == "channel":
        return channel_inverse_norms(x)
    return x.new_empty((), dtype=compute_dtype(x.dtype)).expand(*x.shape[:-3], x.shape[-2] * x.shape[-1])


def channel_inverse_norms(x: Tensor) -> Tensor:
    """1 / max(||v||_2, EPS_NORM) of every position's C-vector v.

    x: (B, C, H, W) or (B, K, C, H, W), any strides, float16/bfloat16/float32/float64.
    Returns (B, H*W) or (B, K, H*W), contiguous, in ``compute_dtype(x.dtype)``.
    """
    rows = _rows_view(x)
    outer, inner, channels, height, width = rows.shape
    n_positions = height * width
    inv_norm = torch.empty((outer, inner, n_positions), dtype=compute_dtype(x.dtype), device=x.device)
    blocks = _channel_blocks(channels, n_positions)
    grid = (triton.cdiv(n_positions, blocks["BLOCK_P"]), outer * inner)
    with on_device(x):
        wrap_triton(_channel_inverse_norms_kernel)[grid](
            rows, inv_norm, *rows.stride(), inner, channels, width, n_positions, EPS_NORM,
            COMPUTE_DTYPE=tl_compute_dtype(x.dtype), **blocks,
        )
    return inv_norm if x.dim() == 5 else inv_norm.squeeze(1)


def _pair_distance_sums(
    anchor: Tensor, others: Tensor, positive: Optional[Tensor],
    anchor_inv: Tensor, others_inv: Tensor, positive_inv: Optional[Tensor],
    distance: str, normalize: str, sign_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Sums over C*H*W of psi(anchor_hat[a] - others_hat[a, k]) (and of psi(anchor_hat[a] - positive_hat[a])).

    anchor, positive: (B, C, H, W); others: (B, K_o, C, H, W), batch stride 0
    when shared by every anchor. *_inv: the matching inverse norms (others_inv
    expanded like others). sign_state: (2, B, C, H, W) integers to fill (l1,
    in-batch: others are the teacher) or None. Returns (B, K_o) and (B,) or None.
    """
    batch, n_others = others.shape[:2]
    _, channels, height, width = anchor.shape
    n_positions = height * width
    blocks = _pair_blocks(batch, n_others, n_positions, others.stride(0) == 0, anchor.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    anchor_blocks = triton.cdiv(batch, blocks["BLOCK_A"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, anchor_blocks, anchor.device)
    dtype = compute_dtype(anchor.dtype)
    pair_sums = torch.empty((n_spans, batch, n_others), dtype=dtype, device=anchor.device)
    has_positive = positive is not None
    positive_sums = torch.empty((n_spans, batch), dtype=dtype, device=anchor.device) if has_positive else pair_sums
    if not has_positive:  # the kernel never reads them; any tensor of the right rank fills the slots
        positive, positive_inv = anchor, anchor_inv
    keep_signs = sign_state is not None
    with on_device(anchor):
        wrap_triton(_pair_distance_sums_kernel)[(n_spans, anchor_blocks)](
            anchor, others, positive, anchor_inv, others_inv, positive_inv, pair_sums, positive_sums,
            sign_state if keep_signs else pair_sums,
            *anchor.stride(), *others.stride(), *positive.stride(), others_inv.stride(0), others_inv.stride(1),
            batch, n_others, channels, n_positions, width, n_position_blocks, channels_per_span,
            HAS_POSITIVE=has_positive, KEEP_SIGNS=keep_signs, **_flags(anchor, distance, normalize), **blocks,
        )
    return pair_sums.sum(dim=0), positive_sums.sum(dim=0) if has_positive else None


def _l2_in_batch_distances(student: Tensor, teacher: Tensor, normalize: str,
                           student_inv: Tensor, teacher_inv: Tensor) -> Tuple[Tensor, Tensor]:
    """(d_pos, d_neg) of l2 with in-batch negatives in closed form: O(B C H W) work, no pairs."""
    batch, channels, height, width = student.shape
    n_positions = height * width
    blocks = _in_batch_blocks(batch, n_positions, student.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, 1, student.device)
    partial = torch.empty((n_spans, batch, 2), dtype=compute_dtype(student.dtype), device=student.device)
    with on_device(student):
        wrap_triton(_l2_in_batch_sums_kernel)[(n_spans,)](
            student, teacher, student_inv, teacher_inv, partial, *student.stride(), *teacher.stride(),
            batch, channels, n_positions, width, n_position_blocks, channels_per_span,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalize == "channel", **blocks,
        )
    sums = partial.sum(dim=0)
    n_elements = channels * n_positions
    return sums[:, 0] / n_elements, sums[:, 1] / ((batch - 1) * n_elements)


def feature_distances_forward(
    student: Tensor, teacher: Tensor, negatives: Optional[Tensor], distance: str, normalize: str,
    keep_state: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_pos, d_neg, saved): see :func:`facd_fast.reference.feature_distances` for the distances.

    student, teacher: (B, C, H, W); negatives: (B, K, C, H, W) or None
    (in-batch); any strides; float16, bfloat16, float32 or float64. d_pos,
    d_neg: (B,) in ``compute_dtype``.

    l2 with in-batch negatives runs in closed form (no pairs). l1 with in-batch
    negatives sweeps the B x B pairs once; with ``keep_state`` it also returns
    what the student's gradient needs, so that the backward is one
    elementwise pass: saved (2, B, C, H, W) of ``sign_state_dtype(B)`` (int8
    for B <= 128: 2 bytes per student element kept between forward and
    backward), [0] = sign(s_hat - t_hat) and [1] = the sum over k != i of
    sign(s_hat_i - t_hat_k). Otherwise saved is an empty int8 tensor.
    """
    batch = student.shape[0]
    n_elements = student[0].numel()
    student_inv, teacher_inv = _inverse_norms(student, normalize), _inverse_norms(teacher, normalize)
    no_state = student.new_empty((0,), dtype=torch.int8)
    if negatives is None and distance == "l2":
        return (*_l2_in_batch_distances(student, teacher, normalize, student_inv, teacher_inv), no_state)
    if negatives is None:
        sign_state = None
        if keep_state:
            if batch > 32768:
                raise ValueError(f"l1 with in-batch negatives keeps its sign sums for B <= 32768, got B={batch}")
            sign_state = torch.empty((2, *student.shape), dtype=sign_state_dtype(batch), device=student.device)
        others = teacher.unsqueeze(0).expand(batch, *teacher.shape)
        others_inv = teacher_inv.unsqueeze(0).expand(batch, *teacher_inv.shape)
        sums, _ = _pair_distance_sums(
            student, others, None, student_inv, others_inv, None, distance, normalize, sign_state
        )
        diagonal = torch.eye(batch, dtype=torch.bool, device=student.device)
        d_pos = sums.diagonal() / n_elements
        d_neg = sums.masked_fill(diagonal, 0).sum(dim=1) / ((batch - 1) * n_elements)
        return d_pos, d_neg, no_state if sign_state is None else sign_state
    negatives_inv = _inverse_norms(negatives, normalize)
    sums, positive_sums = _pair_distance_sums(
        student, negatives, teacher, student_inv, negatives_inv, teacher_inv, distance, normalize
    )
    return positive_sums / n_elements, sums.sum(dim=1) / (negatives.shape[1] * n_elements), no_state


def _anchor_gradient(
    anchor: Tensor, others: Tensor, weights: Tensor,
    anchor_inv: Tensor, others_inv: Tensor,
    positive: Optional[Tensor], positive_weights: Optional[Tensor], positive_inv: Optional[Tensor],
    distance: str, normalize: str,
) -> Tensor:
    """Gradient of sum_{b,k} weights[b, k] d(anchor[b, j], others[b, k]) (+ positive terms) w.r.t. anchor.

    anchor: (B, J, C, H, W), others: (B, K_o, C, H, W) (batch stride 0 when
    shared), weights: (B, K_o) with the 1/(C*H*W) of the mean folded in;
    positive: (B, C, H, W) with positive_weights (B,), or None. Returns a
    tensor like ``anchor``, in its dtype and strides.
    """
    n_rows_outer, per_batch, channels, height, width = anchor.shape
    n_rows = n_rows_outer * per_batch
    n_positions = height * width
    n_others = others.shape[1]
    blocks = _pair_blocks(n_rows, n_others, n_positions, others.stride(0) == 0, anchor.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    row_blocks = triton.cdiv(n_rows, blocks["BLOCK_A"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, row_blocks, anchor.device)
    grad = torch.empty_like(anchor)
    normalized = normalize == "channel"
    dtype = compute_dtype(anchor.dtype)
    # The gradient w.r.t. anchor_hat goes to a whole compute-dtype buffer when phi's backward
    # needs every channel of it at a position, or when several blocks of other rows add up in it.
    accumulates = n_others > blocks["BLOCK_K"]
    buffered = normalized or (accumulates and anchor.dtype != dtype)
    grad_hat = torch.empty(anchor.shape, dtype=dtype, device=anchor.device) if buffered else grad
    has_positive = positive is not None
    # a batch whose weights are all 0 (a masked-out patch) gets exactly 0, even from non-finite features
    active = (weights != 0).any(dim=1)
    if has_positive:
        active = active | (positive_weights != 0)
    active = active.to(torch.int8)
    if not has_positive:  # the kernel never reads them; any tensors of the right rank fill the slots
        positive, positive_weights, positive_inv = anchor[:, 0], weights, anchor_inv
    with on_device(anchor):
        wrap_triton(_pair_gradient_kernel)[(n_spans, row_blocks)](
            anchor, others, positive, weights, positive_weights, anchor_inv, others_inv, positive_inv, grad_hat,
            *anchor.stride(), *others.stride(), *positive.stride(), *grad_hat.stride(),
            *weights.stride(), others_inv.stride(0), others_inv.stride(1), active,
            n_rows, per_batch, n_others, channels, n_positions, width, n_position_blocks, channels_per_span,
            HAS_POSITIVE=has_positive, **_flags(anchor, distance, normalize), **blocks,
        )
        if not normalized and buffered:
            grad.copy_(grad_hat)
        if normalized:
            channel_blocks = _channel_blocks(channels, n_positions)
            wrap_triton(_channel_normalize_backward_kernel)[(triton.cdiv(n_positions, channel_blocks["BLOCK_P"]), n_rows)](
                anchor, grad_hat, grad, *anchor.stride(), *grad_hat.stride(), *grad.stride(),
                active, per_batch, channels, width, n_positions, EPS_NORM,
                COMPUTE_DTYPE=tl_compute_dtype(anchor.dtype), **channel_blocks,
            )
    return grad


def _l1_student_gradient(grad_pos: Tensor, grad_neg: Tensor, student: Tensor, sign_state: Tensor,
                         normalize: str) -> Tensor:
    """The l1 in-batch student gradient from the forward's sign state: one elementwise pass.

    grad_pos, grad_neg: (B,) upstream gradients already divided by C*H*W.
    """
    batch, channels, height, width = student.shape
    n_positions = height * width
    coefficients = torch.stack((grad_pos, grad_neg / (batch - 1)), dim=1).contiguous()
    grad = torch.empty_like(student)
    blocks = _channel_blocks(channels, n_positions)
    with on_device(student):
        wrap_triton(_l1_student_gradient_kernel)[(triton.cdiv(n_positions, blocks["BLOCK_P"]), batch)](
            student, sign_state, coefficients, grad, *student.stride(), *grad.stride(),
            batch, channels, width, n_positions, EPS_NORM,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalize == "channel", **blocks,
        )
    return grad


def _l2_in_batch_gradients(grad_pos: Tensor, grad_neg: Tensor, student: Tensor, teacher: Tensor, normalize: str,
                           student_inv: Tensor, teacher_inv: Tensor, need_student: bool, need_teacher: bool):
    """l2 in-batch gradients in closed form: one pass for s_hat and t_hat, then the normalisation's chain rule.

    grad_pos, grad_neg: (B,) upstream gradients already divided by C*H*W.
    """
    batch, channels, height, width = student.shape
    n_positions = height * width
    normalized = normalize == "channel"
    dtype = compute_dtype(student.dtype)
    grad_pos, weights = (2 * grad_pos).contiguous(), (2 * grad_neg / (batch - 1)).contiguous()

    def output(x: Tensor, needed: bool) -> Tensor:
        if not needed:
            return student.new_empty((1, 1, 1, 1))  # never written (the kernel's flag is off)
        return torch.empty(x.shape, dtype=dtype, device=x.device) if normalized else torch.empty_like(x)

    student_hat, teacher_hat = output(student, need_student), output(teacher, need_teacher)
    blocks = _in_batch_blocks(batch, n_positions, student.dtype)
    n_position_blocks = triton.cdiv(n_positions, blocks["BLOCK_P"])
    n_spans, channels_per_span = _spans(channels, n_position_blocks, 1, student.device)
    with on_device(student):
        wrap_triton(_l2_in_batch_gradient_kernel)[(n_spans,)](
            student, teacher, student_inv, teacher_inv, grad_pos, weights, student_hat, teacher_hat,
            *student.stride(), *teacher.stride(), *student_hat.stride(), *teacher_hat.stride(),
            batch, channels, n_positions, width, n_position_blocks, channels_per_span,
            COMPUTE_DTYPE=tl_compute_dtype(student.dtype), NORMALIZE=normalized,
            NEED_STUDENT=need_student, NEED_TEACHER=need_teacher, **blocks,
        )
    if not normalized:
        return (student_hat if need_student else None), (teacher_hat if need_teacher else None)
    student_active = ((grad_pos != 0) | (weights != 0)).to(torch.int8)
    teacher_active = torch.ones(batch, dtype=torch.int8, device=student.device)
    grads = []
    channel_blocks = _channel_blocks(channels, n_positions)
    for x, grad_hat, active, needed in ((student, student_hat, student_active, need_student),
                                        (teacher, teacher_hat, teacher_active, need_teacher)):
        if not needed:
            grads.append(None)
            continue
        grad = torch.empty_like(x)
        rows, hat_rows, grad_rows = _rows_view(x), _rows_view(grad_hat), _rows_view(grad)
        with on_device(x):
            wrap_triton(_channel_normalize_backward_kernel)[(triton.cdiv(n_positions, channel_blocks["BLOCK_P"]), batch)](
                rows, hat_rows, grad_rows, *rows.stride(), *hat_rows.stride(), *grad_rows.stride(),
                active, 1, channels, width, n_positions, EPS_NORM,
                COMPUTE_DTYPE=tl_compute_dtype(x.dtype), **channel_blocks,
            )
        grads.append(grad)
    return tuple(grads)


def feature_distances_backward(
    grad_pos: Tensor, grad_neg: Tensor,
    student: Tensor, teacher: Tensor, negatives: Optional[Tensor], saved: Tensor,
    distance: str, normalize: str, output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_pos * d_pos + grad_neg * d_neg) w.r.t. student, teacher, negatives.

    grad_pos, grad_neg: (B,) upstream gradients; saved: what the forward kept
    (empty if nothing); output_mask: which of the three gradients to compute;
    the rest as in :func:`feature_distances_forward`. Each gradient is shaped,
    typed and strided like its input where asked for, an empty tensor where
    not (tests/closed_form.py has the formulas). In-batch: l2 in closed form
    (one pass); l1's student from the saved sign sums when kept (one pass),
    its teacher by a sweep over the pairs. A patch whose upstream gradients
    are both 0 gets exactly 0, whatever its features hold.
    """
    need_student, need_teacher, need_negatives = output_mask
    batch = student.shape[0]
    n_elements = student[0].numel()
    dtype = compute_dtype(student.dtype)
    grad_pos = grad_pos.to(dtype) / n_elements
    grad_neg = grad_neg.to(dtype) / n_elements
    # custom ops may not return aliases: one empty tensor per gradient not asked for
    g_student, g_teacher, g_negatives = (student.new_empty((0,)) for _ in range(3))
    if negatives is None and distance == "l1" and need_student and saved.numel() > 0:
        g_student = _l1_student_gradient(grad_pos, grad_neg, student, saved, normalize)
        need_student = False
        if not need_teacher:
            return g_student, g_teacher, g_negatives
    student_inv, teacher_inv = _inverse_norms(student, normalize), _inverse_norms(teacher, normalize)
    if negatives is None and distance == "l2":
        s, t = _l2_in_batch_gradients(grad_pos, grad_neg, student, teacher, normalize, student_inv, teacher_inv,
                                      need_student, need_teacher)
        return (g_student if s is None else s), (g_teacher if t is None else t), g_negatives
    # inverse norms of a (B, C, H, W) feature viewed as (B, 1, C, H, W) rows
    student_rows, teacher_rows = student.unsqueeze(1), teacher.unsqueeze(1)
    student_rows_inv = student_inv.unsqueeze(1)

    if negatives is None:
        # weights[i, k] of the pair (s_i, t_k): grad_neg_i / (B - 1) off the diagonal, grad_pos_i on it
        weights = (grad_neg / (batch - 1)).unsqueeze(1).expand(batch, batch).clone()
        weights.diagonal().copy_(grad_pos)
        if need_student:
            g_student = _anchor_gradient(
                student_rows, teacher.unsqueeze(0).expand(batch, *teacher.shape), weights,
                student_inv, teacher_inv.unsqueeze(0).expand(batch, *teacher_inv.shape),
                None, None, None, distance, normalize,
            ).squeeze(1)
        if need_teacher:
            # d/dt_k of psi(s_i - t_k) is psi'(t_k - s_i): t_k is the anchor, the students its others
            g_teacher = _anchor_gradient(
                teacher_rows, student.unsqueeze(0).expand(batch, *student.shape), weights.t(),
                teacher_inv, student_inv.unsqueeze(0).expand(batch, *student_inv.shape),
                None, None, None, distance, normalize,
            ).squeeze(1)
        return g_student, g_teacher, g_negatives

    n_negatives = negatives.shape[1]
    negatives_inv = _inverse_norms(negatives, normalize)
    negative_weights = (grad_neg / n_negatives).unsqueeze(1)  # (B, 1): the same weight for each k
    if need_student:
        g_student = _anchor_gradient(
            student_rows, negatives, negative_weights.expand(batch, n_negatives),
            student_inv, negatives_inv, teacher, grad_pos, teacher_inv, distance, normalize,
        ).squeeze(1)
    if need_teacher:
        g_teacher = _anchor_gradient(
            teacher_rows, student_rows, grad_pos.unsqueeze(1),
            teacher_inv, student_rows_inv, None, None, None, distance, normalize,
        ).squeeze(1)
    if need_negatives:
        g_negatives = _anchor_gradient(
            negatives, student_rows, negative_weights,
            negatives_inv.flatten(0, 1), student_rows_inv, None, None, None, distance, normalize,
        )
    return g_student, g_teacher, g_negatives
