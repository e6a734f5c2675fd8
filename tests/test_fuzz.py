"""Property-based fuzzing of the public API: every fused backend against the float64 reference.

Hypothesis draws the case (shape with B >= 2 and odd and prime sizes, memory
layout of each input, dtype, every option, the mask, which inputs need a
gradient, the upstream gradient) and a seed for the values; each case runs the
fused backend through ``backend=`` and the reference (``backend="reference"``
on float64 copies), forward and backward. Tolerances follow the kernel tests:
each result must be within twice the worst error of the reference computed in
the inputs' dtype, plus a relative 1e-5 (float32), 1e-10 (float64) or one
rounding step (float16, bfloat16) of the largest reference value.

The cases are derandomised (the same ones every run, so CI never flakes);
``FACD_FUZZ_RANDOM=1`` draws new ones. ``CASES`` gives the count per backend
and function; each test asserts that it ran that many.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import facd_fast

FUSED = [name for name in facd_fast.available_backends() if name != "reference"]
SIZES = (1, 2, 3, 5, 7)  # odd and prime, and the degenerate 1
BATCHES = (2, 3, 5, 7)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed", "expanded-batch", "expanded-width")

# Cases per backend: the C++ backend is fast; the Triton backend runs in its interpreter on CPU.
CASES = {
    "cpp": {"contrastive_loss": 1000, "adaptive_mask": 300, "FACDLoss": 100},
    "triton": {"contrastive_loss": 30, "adaptive_mask": 10, "FACDLoss": 5},
}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# An absolute floor for results that are zero in exact arithmetic (a C = 1 normalised feature
# has zero gradient; the kernels may leave rounding residue of ~1e-23 there).
ATOL = {torch.float32: 1e-12, torch.float64: 1e-20, torch.float16: 1e-7, torch.bfloat16: 1e-7}


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    derandomize=os.environ.get("FACD_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def backend_param(name: str):
    marks = [pytest.mark.triton, pytest.mark.slow] if name == "triton" else []
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [backend_param(name) for name in FUSED if name in CASES]


def make_tensor(shape, dtype, layout: str, generator: torch.Generator) -> torch.Tensor:
    """Random normal values of logical ``shape`` (..., C, H, W) stored in ``layout``."""
    *lead, c, h, w = shape

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(dtype)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "channels_last":
        return randn(*lead, h, w, c).movedim(-1, -3)
    if layout == "sliced":
        return randn(*lead, c + 2, h, 2 * w)[..., 1:c + 1, :, ::2]
    if layout == "transposed":
        return randn(*lead, c, w, h).transpose(-1, -2)
    if layout == "expanded-batch":  # every patch the same tensor: stride 0 over B
        return randn(1, *shape[1:]).expand(shape)
    if layout == "expanded-width":  # constant along W: stride 0 over W
        return randn(*lead, c, h, 1).expand(shape)
    raise ValueError(layout)


def assert_matches_reference(name: str, out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor) -> None:
    """|out - ref64| <= 2 max|lowp - ref64| + rtol max|ref64| + atol, elementwise.

    ``lowp`` is the reference computed in ``out``'s dtype: a fused result may be
    off by twice the worst error plain torch makes in that precision (gradients
    subtract terms of similar size, so a relative-to-the-result bound alone
    would fail on honest rounding), plus one rounding step of the dtype.
    """
    assert out.dtype == lowp.dtype, f"{name}: dtype {out.dtype}, expected {lowp.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} vs reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite result {out}"
    if not ref64.numel():
        return
    scale = ref64.abs().max().item()
    rtol = RTOL.get(out.dtype, torch.finfo(out.dtype).eps)
    bound = 2 * (lowp.double() - ref64).abs().max().item() + rtol * scale + ATOL[out.dtype]
    error = (out.double() - ref64).abs().max().item()
    assert error <= bound, f"{name}: error {error:.3e} over the bound {bound:.3e} (reference scale {scale:.3e})"


@st.composite
def loss_cases(draw):
    batch = draw(st.sampled_from(BATCHES))
    shape = (batch, *(draw(st.sampled_from(SIZES)) for _ in range(3)))
    negatives = draw(st.sampled_from([0, 0, 1, 2, 3]))  # 0: in-batch negatives
    return {
        "shape": shape,
        "negatives": negatives,
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        "distance": draw(st.sampled_from(["l1", "l2"])),
        "normalize": draw(st.sampled_from(["channel", "none"])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "eps": draw(st.sampled_from([1e-6, 1e-3, 0.5, 2.0])),
        "mask": draw(st.sampled_from([None, "bool", "float", "int", "all-zero"])),
        "grads": draw(st.sampled_from([("student",), ("student", "teacher"), ("student", "teacher", "negatives"),
                                       ("teacher",)])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def loss_inputs(case):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    shape = case["shape"]
    student = make_tensor(shape, dtype, case["layouts"][0], generator)
    teacher = make_tensor(shape, dtype, case["layouts"][1], generator)
    negatives = None
    if case["negatives"]:
        negatives = make_tensor((shape[0], case["negatives"], *shape[1:]), dtype, case["layouts"][2], generator)
    batch = shape[0]
    bits = torch.rand(batch, generator=generator) < 0.6
    mask = {None: None, "bool": bits, "float": bits.to(dtype), "int": bits.to(torch.int64),
            "all-zero": torch.zeros(batch, dtype=torch.bool)}[case["mask"]]
    out_shape = (batch,) if case["reduction"] == "none" else ()
    upstream = torch.randn(out_shape, generator=generator, dtype=torch.float64)
    return student, teacher, negatives, mask, upstream


def loss_and_grads(inputs, case, backend, dtype=None):
    """The loss and the gradients of (loss * upstream).sum() w.r.t. the inputs named in case["grads"]."""
    student, teacher, negatives, mask, upstream = inputs
    named = {"student": student, "teacher": teacher, "negatives": negatives}
    leaves = {}
    for name, x in named.items():
        if x is None:
            continue
        x = x.detach() if dtype is None else x.detach().to(dtype)  # .to keeps the strides
        if name in case["grads"]:
            x.requires_grad_()
            leaves[name] = x
        named[name] = x
    loss = facd_fast.contrastive_loss(
        named["student"], named["teacher"], named["negatives"], mask=mask, distance=case["distance"],
        normalize=case["normalize"], eps=case["eps"], reduction=case["reduction"], backend=backend)
    grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), list(leaves.values()), allow_unused=True) \
        if leaves else ()
    return loss.detach(), {name: g for name, g in zip(leaves, grads)}


def check_loss_case(case, backend):
    inputs = loss_inputs(case)
    dtype = DTYPES[case["dtype"]]
    out, out_grads = loss_and_grads(inputs, case, backend)
    ref, ref_grads = loss_and_grads(inputs, case, "reference", torch.float64)
    lowp, lowp_grads = loss_and_grads(inputs, case, "reference")
    assert_matches_reference("loss", out, ref, lowp)
    # One channel, normalised: phi = sign(x), so the exact gradient is zero; the kernels' is rounding
    # residue of phi^2 = 1 - ulp times a derivative of up to 1/eps, checked for size only.
    degenerate = case["shape"][1] == 1 and case["normalize"] == "channel"
    for name, grad in out_grads.items():
        expected = ref_grads[name]
        if expected is None:  # the loss does not depend on this input (e.g. an all-zero mask)
            assert grad is None or not grad.any(), f"{name}: gradient where the reference has none"
            continue
        grad = torch.zeros_like(inputs[["student", "teacher", "negatives"].index(name)]) if grad is None else grad
        assert grad.dtype == dtype and grad.shape == expected.shape, name
        if degenerate:
            assert torch.isfinite(grad).all() and grad.double().abs().max() <= 1e-3, f"{name}: {grad}"
            continue
        lowp_grad = lowp_grads.get(name)
        assert_matches_reference(f"grad {name}", grad, expected,
                                 torch.zeros_like(grad) if lowp_grad is None else lowp_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_loss_matches_reference(backend):
    ran = []

    @fuzz_settings(CASES[backend]["contrastive_loss"])
    @given(loss_cases())
    def run(case):
        ran.append(case)
        check_loss_case(case, backend)

    run()
    assert len(ran) >= CASES[backend]["contrastive_loss"]


@st.composite
def mask_cases(draw):
    return {
        "shape": (draw(st.sampled_from((1, *BATCHES))), 3, draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        "margin_db": draw(st.sampled_from([0.0, 0.5, -1.0, 3.0])),
        "data_range": draw(st.sampled_from([1.0, 255.0])),
        "teacher_noise": draw(st.sampled_from([0.0, 0.01, 0.1, 1.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_mask_case(case, backend):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    hr = make_tensor(case["shape"], torch.float64, case["layouts"][2], generator).sigmoid()
    student = hr + 0.1 * make_tensor(case["shape"], torch.float64, case["layouts"][0], generator)
    teacher = hr + case["teacher_noise"] * make_tensor(case["shape"], torch.float64, case["layouts"][1], generator)
    images = [x.to(dtype) for x in (student, teacher, hr)]  # .to keeps the strides
    mask = facd_fast.adaptive_mask(*images, margin_db=case["margin_db"], data_range=case["data_range"], backend=backend)
    assert mask.dtype == torch.bool and mask.shape == (case["shape"][0],)
    # The rule by hand in float64 on the same (rounded) values: teacher's PSNR lead > margin.
    s, t, h = (x.double() for x in images)
    mse_s = (s - h).square().mean(dim=(1, 2, 3))
    mse_t = (t - h).square().mean(dim=(1, 2, 3))
    threshold = mse_t * 10.0 ** (case["margin_db"] / 10.0)
    expected = mse_s > threshold
    # Patches within float32 accumulation error of the threshold may go either way.
    clear = (mse_s - threshold).abs() > 1e-5 * torch.maximum(mse_s, threshold) + 1e-30
    assert torch.equal(mask[clear], expected[clear]), f"mask {mask.tolist()} vs expected {expected.tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_mask_matches_the_rule(backend):
    ran = []

    @fuzz_settings(CASES[backend]["adaptive_mask"])
    @given(mask_cases())
    def run(case):
        ran.append(case)
        check_mask_case(case, backend)

    run()
    assert len(ran) >= CASES[backend]["adaptive_mask"]


@st.composite
def module_cases(draw):
    taps = draw(st.integers(1, 3))
    return {
        "batch": draw(st.sampled_from(BATCHES)),
        # C >= 2: a single normalised channel has an exactly-zero gradient (see check_loss_case).
        "taps": [(draw(st.sampled_from(SIZES[1:])), draw(st.sampled_from(SIZES))) for _ in range(taps)],
        "weights": [draw(st.sampled_from([0.0, 0.5, 1.0, 3])) for _ in range(taps)],
        "use_mask": draw(st.booleans()),
        "margin_db": draw(st.sampled_from([0.0, 1.0, -2.0])),
        "distance": draw(st.sampled_from(["l1", "l2"])),
        "normalize": draw(st.sampled_from(["channel", "none"])),
        "dtype": draw(st.sampled_from(["float32", "float64"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_module_case(case, backend):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    batch = case["batch"]
    students = [torch.randn(batch, c, h, h, generator=generator, dtype=dtype) for c, h in case["taps"]]
    teachers = [torch.randn(batch, c, h, h, generator=generator, dtype=dtype) for c, h in case["taps"]]
    hr = torch.rand(batch, 3, 6, 6, generator=generator, dtype=dtype)
    sr_student = hr + 0.1 * torch.randn(hr.shape, generator=generator, dtype=dtype)
    sr_teacher = hr + 0.1 * torch.randn(hr.shape, generator=generator, dtype=dtype)
    options = dict(use_mask=case["use_mask"], margin_db=case["margin_db"], distance=case["distance"],
                   normalize=case["normalize"])
    results = {}
    for name in (backend, "reference"):
        leaves = [s.clone().requires_grad_() for s in students]
        loss, diagnostics = facd_fast.FACDLoss(case["weights"], backend=name, **options)(
            leaves, teachers, sr_student, sr_teacher, hr)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results[name] = (loss.detach(), diagnostics, [torch.zeros_like(s) if g is None else g for g, s in zip(grads, students)])
    (loss, diagnostics, grads), (ref, ref_diagnostics, ref_grads) = results[backend], results["reference"]
    rtol = RTOL[dtype] * 10  # the reference runs in the same dtype here, not in float64
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=rtol * max(ref.abs().item(), 1e-30))
    assert torch.equal(diagnostics["mask"], ref_diagnostics["mask"])
    torch.testing.assert_close(diagnostics["tap_losses"], ref_diagnostics["tap_losses"], rtol=rtol, atol=rtol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=rtol * max(ref_grad.abs().max().item(), 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_facd_loss_module_matches_reference(backend):
    ran = []

    @fuzz_settings(CASES[backend]["FACDLoss"])
    @given(module_cases())
    def run(case):
        ran.append(case)
        check_module_case(case, backend)

    run()
    assert len(ran) >= CASES[backend]["FACDLoss"]


def test_every_fused_backend_is_fuzzed():
    assert set(FUSED) <= set(CASES), f"backends without fuzz counts: {sorted(set(FUSED) - set(CASES))}"
