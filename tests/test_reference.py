"""The reference FACD loss and mask against hand-worked values, gradcheck and properties.

Every expected number here is worked out by hand in the comments, not by
calling the reference.
"""
import itertools
import math

import pytest
import torch

import facd_fast
from facd_fast import reference
from closed_form import distances_backward

EPS = 1e-6


def loss(*args, **kwargs):
    return facd_fast.contrastive_loss(*args, backend="reference", **kwargs)


def pair_batch():
    """B=2, C=1, H=1, W=2: s_0=(1,2), s_1=(0,0), t_0=(1,0), t_1=(3,2)."""
    s = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 2.0]]]], dtype=torch.float64)
    return s, t


# --- hand-worked values ---------------------------------------------------------------------------


def test_l1_in_batch_no_normalisation_by_hand():
    s, t = pair_batch()
    # d(s0,t0)=mean(0,2)=1, d(s0,t1)=mean(2,0)=1, d(s1,t1)=mean(3,2)=2.5, d(s1,t0)=mean(1,0)=0.5
    l0, l1 = 1.0 / (1.0 + EPS), 2.5 / (0.5 + EPS)
    out = loss(s, t, normalize="none", reduction="none")
    torch.testing.assert_close(out, torch.tensor([l0, l1], dtype=torch.float64), rtol=1e-12, atol=0)
    assert loss(s, t, normalize="none").item() == pytest.approx((l0 + l1) / 2, rel=1e-12)
    assert loss(s, t, normalize="none", reduction="sum").item() == pytest.approx(l0 + l1, rel=1e-12)


def test_l2_in_batch_no_normalisation_by_hand():
    s, t = pair_batch()
    # d(s0,t0)=mean(0,4)=2, d(s0,t1)=mean(4,0)=2, d(s1,t1)=mean(9,4)=6.5, d(s1,t0)=mean(1,0)=0.5
    expected = torch.tensor([2.0 / (2.0 + EPS), 6.5 / (0.5 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(loss(s, t, distance="l2", normalize="none", reduction="none"), expected, rtol=1e-12, atol=0)


def test_channel_normalisation_by_hand():
    # B=2, C=2, H=W=1: s_0=(3,4)->(.6,.8), s_1=(0,2)->(0,1), t_0=(4,3)->(.8,.6), t_1=(1,0)->(1,0)
    s = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64).view(2, 2, 1, 1)
    t = torch.tensor([[4.0, 3.0], [1.0, 0.0]], dtype=torch.float64).view(2, 2, 1, 1)
    # l1 means over C*H*W=2: d(s0,t0)=(.2+.2)/2=.2, d(s0,t1)=(.4+.8)/2=.6, d(s1,t1)=(1+1)/2=1, d(s1,t0)=(.8+.4)/2=.6
    expected = torch.tensor([0.2 / (0.6 + EPS), 1.0 / (0.6 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(loss(s, t, reduction="none"), expected, rtol=1e-12, atol=0)
    # l2: d(s0,t0)=(.04+.04)/2=.04, d(s0,t1)=(.16+.64)/2=.4, d(s1,t1)=(1+1)/2=1, d(s1,t0)=(.64+.16)/2=.4
    expected_l2 = torch.tensor([0.04 / (0.4 + EPS), 1.0 / (0.4 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(loss(s, t, distance="l2", reduction="none"), expected_l2, rtol=1e-12, atol=0)


def test_zero_feature_normalises_to_zero():
    # A zero C-vector has norm 0 < 1e-6: phi divides by 1e-6 and keeps it 0.
    s = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64).view(2, 2, 1, 1)
    t = torch.tensor([[4.0, 3.0], [1.0, 0.0]], dtype=torch.float64).view(2, 2, 1, 1)
    # s_0 -> (0,0): d(s0,t0)=(.8+.6)/2=.7, d(s0,t1)=(1+0)/2=.5; s_1 -> (0,1): d(s1,t1)=1, d(s1,t0)=.6
    expected = torch.tensor([0.7 / (0.5 + EPS), 1.0 / (0.6 + EPS)], dtype=torch.float64)
    torch.testing.assert_close(loss(s, t, reduction="none"), expected, rtol=1e-12, atol=0)


def test_explicit_negatives_by_hand():
    # B=1, K=2: s=(1,2), t=(1,0), n_0=(0,0), n_1=(2,2); d_pos=1, d(s,n0)=1.5, d(s,n1)=.5, mean=1
    s = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    n = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64).view(1, 2, 1, 1, 2)
    assert loss(s, t, n, normalize="none").item() == pytest.approx(1.0 / (1.0 + EPS), rel=1e-12)


def test_mask_by_hand():
    s, t = pair_batch()
    l1 = 2.5 / (0.5 + EPS)
    mask = torch.tensor([0, 1])
    torch.testing.assert_close(
        loss(s, t, mask=mask, normalize="none", reduction="none"),
        torch.tensor([0.0, l1], dtype=torch.float64), rtol=1e-12, atol=0,
    )
    # masked patches still count in B for "mean"
    assert loss(s, t, mask=mask.bool(), normalize="none").item() == pytest.approx(l1 / 2, rel=1e-12)


def test_gradient_by_hand():
    s, t = pair_batch()
    s.requires_grad_(True)
    # l_0 = P/Q, P = mean|s0-t0| (diff (0,2)), Q = mean|s0-t1| (diff (-2,0)), P = Q = 1:
    # dP/ds0 = (0, 1)/2, dQ/ds0 = (-1, 0)/2, dl0/ds0 = dP/Q - P dQ/Q^2 = (0.5, 0.5).
    # l_1 = mean|s1-t1| / mean|s1-t0|: diffs (-3,-2) and (-1,0), P=2.5, Q=.5:
    # dP/ds1 = (-1,-1)/2, dQ/ds1 = (-1, 0)/2, dl1/ds1 = (-.5,-.5)/.5 - 2.5 (-.5, 0)/.25 = (4, -1).
    loss(s, t, normalize="none", reduction="sum", eps=1e-12).backward()
    expected = torch.tensor([[[[0.5, 0.5]]], [[[4.0, -1.0]]]], dtype=torch.float64)
    torch.testing.assert_close(s.grad, expected, rtol=1e-9, atol=1e-9)


def test_fp16_is_computed_in_float32_and_returned_in_fp16():
    s, t = pair_batch()
    out = loss(s.half(), t.half(), normalize="none", reduction="none")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), torch.tensor([1.0, 5.0], dtype=torch.float64), rtol=1e-3, atol=0)


def test_adaptive_mask_by_hand():
    hr = torch.zeros(2, 3, 1, 2)
    sr_student = torch.full_like(hr, 0.1)
    sr_teacher = torch.full_like(hr, 0.2)
    sr_teacher[1] = 0.05  # patch 1: teacher mse .0025 vs student .01 -> gap 10 log10(4) = 6.02 dB
    assert facd_fast.adaptive_mask(sr_student, sr_teacher, hr).tolist() == [False, True]
    assert facd_fast.adaptive_mask(sr_student, sr_teacher, hr, margin_db=6.0).tolist() == [False, True]
    assert facd_fast.adaptive_mask(sr_student, sr_teacher, hr, margin_db=6.1).tolist() == [False, False]
    # the gap is independent of the peak value
    assert facd_fast.adaptive_mask(sr_student * 255, sr_teacher * 255, hr, data_range=255.0).tolist() == [False, True]


def test_adaptive_mask_perfect_outputs():
    hr = torch.rand(3, 3, 4, 4)
    sr_student = torch.stack([hr[0] + 0.1, hr[1], hr[2]])
    sr_teacher = torch.stack([hr[0], hr[1], hr[2] + 0.1])
    # perfect teacher, imperfect student: teach; both perfect: don't; perfect student: don't
    expected = [True, False, False]
    assert facd_fast.adaptive_mask(sr_student, sr_teacher, hr).tolist() == expected
    assert reference.adaptive_mask(sr_student, sr_teacher, hr).tolist() == expected


def test_facd_loss_module_by_hand():
    s, t = pair_batch()
    hr = torch.zeros(2, 3, 1, 1)
    sr_student = torch.full_like(hr, 0.1)
    sr_teacher = torch.tensor([0.2, 0.05]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    module = facd_fast.FACDLoss(tap_weights=(1.0, 0.5), normalize="none", backend="reference")
    total, diagnostics = module([s, s], [t, t], sr_student, sr_teacher, hr)
    l1 = 2.5 / (0.5 + EPS)  # only patch 1 is distilled
    assert total.item() == pytest.approx(1.5 * l1 / 2, rel=1e-12)
    assert diagnostics["mask"].tolist() == [False, True]
    assert diagnostics["distilled_fraction"].item() == 0.5
    # gaps: patch 0: 10 log10(.01/.04) = -6.02, patch 1: 10 log10(.01/.0025) = +6.02
    assert diagnostics["psnr_gap_db"].item() == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(diagnostics["tap_losses"], torch.tensor([l1 / 2, l1 / 2]), rtol=1e-6, atol=0)
    _, unmasked = facd_fast.FACDLoss(tap_weights=(1.0,), use_mask=False, normalize="none", backend="reference")(
        [s], [t], sr_student, sr_teacher, hr
    )
    assert unmasked["tap_losses"].item() == pytest.approx((1.0 + l1) / 2, rel=1e-6)


# --- gradcheck over every option ------------------------------------------------------------------

OPTIONS = list(
    itertools.product(("l1", "l2"), ("channel", "none"), ("in-batch", "explicit"), ("mean", "sum", "none"), (False, True))
)


@pytest.mark.parametrize(
    "distance,normalize,negatives,reduction,masked", OPTIONS, ids=["-".join(map(str, o)) for o in OPTIONS]
)
def test_gradcheck_every_option(distance, normalize, negatives, reduction, masked):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 3)
    s = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    inputs = [s, t]
    if negatives == "explicit":
        inputs.append(torch.randn((3, 2, *shape[1:]), generator=gen, dtype=torch.float64, requires_grad=True))
    mask = torch.tensor([1, 0, 1]) if masked else None

    def fn(*xs):
        return loss(*xs, mask=mask, distance=distance, normalize=normalize, reduction=reduction)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("distance", ("l1", "l2"))
@pytest.mark.parametrize("normalize", ("channel", "none"))
@pytest.mark.parametrize("negatives", ("in-batch", "explicit"))
def test_closed_form_gradients_match_autograd(distance, normalize, negatives):
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    n = None
    inputs = [s, t]
    if negatives == "explicit":
        n = torch.randn(4, 3, 3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        inputs.append(n)
    d_pos, d_neg = reference.feature_distances(s, t, n, distance, normalize)
    grad_pos, grad_neg = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    autograd = torch.autograd.grad((d_pos, d_neg), inputs, (grad_pos, grad_neg))
    by_hand = distances_backward(grad_pos, grad_neg, s.detach(), t.detach(), None if n is None else n.detach(), distance, normalize)
    for got, want in zip(by_hand, autograd):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- properties -----------------------------------------------------------------------------------


def random_features(seed=0, shape=(4, 3, 5, 6), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("distance", ("l1", "l2"))
def test_channel_normalisation_is_scale_invariant(distance):
    s, t = random_features()
    base = loss(s, t, distance=distance)
    torch.testing.assert_close(loss(s * 3.7, t, distance=distance), base, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss(s, t * 0.02, distance=distance), base, rtol=1e-12, atol=0)


def test_unnormalised_loss_is_not_scale_invariant():
    s, t = random_features()
    assert not torch.allclose(loss(s * 3.7, t, normalize="none"), loss(s, t, normalize="none"))


@pytest.mark.parametrize("negatives", ("in-batch", "explicit"))
def test_batch_permutation_permutes_per_patch_losses(negatives):
    s, t = random_features()
    n = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64) if negatives == "explicit" else None
    perm = torch.tensor([2, 0, 3, 1])
    out = loss(s, t, n, reduction="none")
    permuted = loss(s[perm], t[perm], None if n is None else n[perm], reduction="none")
    torch.testing.assert_close(permuted, out[perm], rtol=1e-12, atol=0)


def test_masked_patches_add_nothing_and_get_no_gradient():
    s, t = random_features()
    s.requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 0])
    per_patch = loss(s, t, mask=mask, reduction="none")
    assert per_patch[1].item() == 0.0 and per_patch[3].item() == 0.0
    per_patch.sum().backward()
    assert torch.all(s.grad[1] == 0) and torch.all(s.grad[3] == 0)
    assert torch.all(s.grad[0] != 0)
    # the loss over the kept patches equals the unmasked loss restricted to them
    unmasked = loss(s.detach(), t, reduction="none")
    torch.testing.assert_close(per_patch.detach()[[0, 2]], unmasked[[0, 2]], rtol=1e-12, atol=0)


def test_mean_is_sum_over_batch():
    s, t = random_features()
    mask = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss(s, t, mask=mask), loss(s, t, mask=mask, reduction="sum") / 4, rtol=1e-12, atol=0)


def test_gradients_reach_teacher_and_negatives_not_mask():
    s, t = random_features()
    n = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    s.requires_grad_(True)
    t.requires_grad_(True)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    loss(s, t, n, mask=mask).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0 and n.grad.abs().sum() > 0
    assert mask.grad is None


def test_nan_propagates_without_crashing():
    s, t = random_features()
    s[0, 0, 0, 0] = float("nan")
    assert math.isnan(loss(s, t).item())
    t[2, 1, 1, 1] = float("inf")
    assert not math.isfinite(loss(s, t, normalize="none").item())
    # a NaN on a masked-out patch is dropped with the patch
    s2, t2 = random_features()
    s2[0, 0, 0, 0] = float("nan")
    per_patch = loss(s2, t2, negatives=torch.randn(4, 1, 3, 5, 6, dtype=torch.float64), mask=torch.tensor([0, 1, 1, 1]))
    assert math.isfinite(per_patch.item())


def test_reference_backend_is_listed_and_auto_on_cpu_runs():
    assert "reference" in facd_fast.available_backends()
    s, t = random_features(dtype=torch.float32)
    torch.testing.assert_close(
        facd_fast.contrastive_loss(s, t), facd_fast.contrastive_loss(s, t, backend="reference"), rtol=1e-5, atol=1e-7
    )
