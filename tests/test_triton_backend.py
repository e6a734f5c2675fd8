"""The Triton backend against the reference: every option, dtype and layout, forward and backward.

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1) at tiny shapes; with a GPU the
same tests run compiled on CUDA tensors at larger ones. Select them alone
with ``pytest -m triton``.

Accuracy criterion (flash-attention's): against a float64 reference, the
kernel's error is at most twice the error of the reference computed in the
kernel's own precision, plus a small atol scaled to the result.
"""
import itertools
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import facd_fast  # noqa: E402
from facd_fast import reference  # noqa: E402
from facd_fast import backends  # noqa: E402
from facd_fast.backends import BackendUnavailable, backend_names, resolve  # noqa: E402
from facd_fast.backends import triton as triton_backend  # noqa: E402
from facd_fast.kernels import contrastive as contrastive_kernels  # noqa: E402
from facd_fast.kernels import patch_mse as patch_mse_kernels  # noqa: E402
from facd_fast.kernels import utils as kernel_utils  # noqa: E402
from closed_form import distances_backward  # noqa: E402

pytestmark = pytest.mark.triton

DEVICES = (["cpu"] if triton_backend.INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])

#: (B, C, H, W, K): odd and prime sizes, the interpreter's largest case, a single pixel.
SHAPES = {
    "cpu": [(3, 5, 3, 4, 2), (4, 8, 6, 5, 2), (2, 2, 1, 1, 1)],
    "cuda": [(5, 37, 13, 17, 3), (16, 64, 24, 24, 8), (8, 256, 12, 12, 4)],
}
NEGATIVES = ("in-batch", "explicit")
DISTANCES = ("l1", "l2")
NORMALIZATIONS = ("channel", "none")
OPTIONS = list(itertools.product(NEGATIVES, DISTANCES, NORMALIZATIONS))
#: Addressing and tiling do not depend on the distance: each (negatives, normalize) once, both distances.
ADDRESSING_OPTIONS = [
    ("in-batch", "l1", "channel"), ("in-batch", "l2", "none"), ("explicit", "l2", "channel"), ("explicit", "l1", "none")
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
#: atol as a fraction of the largest reference value, by the dtype of the compared result.
RELATIVE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def shape_id(shape):
    return "B{}-C{}-H{}-W{}-K{}".format(*shape)


def cases(*axes, shapes=slice(None)):
    """pytest params: each device, its shapes (those ``shapes`` selects), and every combination of the axes' values."""
    params = []
    for device in DEVICES:
        for shape in SHAPES[device][shapes]:
            for combo in itertools.product(*axes):
                ids = [device, shape_id(shape)] + ["-".join(map(str, v)) if isinstance(v, tuple) else v for v in combo]
                params.append(pytest.param(device, shape, *combo, id="-".join(ids)))
    return params


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty and torch.empty_like give NaN-filled tensors: an element no kernel writes shows up as NaN."""

    def poisoning(allocate):
        def allocate_poisoned(*args, **kwargs):
            x = allocate(*args, **kwargs)
            if x.is_floating_point():
                x.fill_(float("nan"))
            return x

        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoning(torch.empty_like))


def triton_ops(device):
    return resolve("triton", torch.device(device))[1]


def make_feature(shape, dtype, device, layout, generator):
    """A random (..., C, H, W) tensor laid out as asked, built without a copy that would undo the layout.

    ``channels_last``: C innermost; ``strided``: every other column of a wider
    tensor; ``expanded``: one block shared along dim 0 (batch stride 0).
    """
    *outer, channels, height, width = shape
    if layout == "channels_last":
        base = torch.randn(*outer, height, width, channels, generator=generator)
        return base.to(device=device, dtype=dtype).movedim(-1, -3)
    if layout == "strided":
        base = torch.randn(*outer, channels, height, 2 * width, generator=generator)
        return base.to(device=device, dtype=dtype)[..., ::2]
    if layout == "expanded":
        base = torch.randn(1, *shape[1:], generator=generator)
        return base.to(device=device, dtype=dtype).expand(*shape)
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def make_inputs(shape, negatives, dtype, device, layout="contiguous", negatives_layout=None, seed=0):
    """student, teacher, negatives (None for in-batch) and upstream gradients (grad_pos, grad_neg)."""
    batch, channels, height, width, n_negatives = shape
    generator = torch.Generator().manual_seed(seed)
    student = make_feature((batch, channels, height, width), dtype, device, layout, generator)
    teacher = make_feature((batch, channels, height, width), dtype, device, layout, generator)
    explicit = None
    if negatives == "explicit":
        explicit = make_feature(
            (batch, n_negatives, channels, height, width), dtype, device, negatives_layout or layout, generator
        )
    compute = reference.compute_dtype(dtype)
    grad_pos = torch.randn(batch, generator=generator).to(device=device, dtype=compute)
    grad_neg = torch.randn(batch, generator=generator).to(device=device, dtype=compute)
    return student, teacher, explicit, grad_pos, grad_neg


def distances_and_gradients(feature_distances, student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    """(d_pos, d_neg, gradients of sum(grad_pos d_pos + grad_neg d_neg) w.r.t. every feature input)."""
    inputs = [x.detach().requires_grad_() for x in (student, teacher, negatives) if x is not None]
    d_pos, d_neg = feature_distances(*inputs[:2], inputs[2] if negatives is not None else None, distance, normalize)
    grads = torch.autograd.grad((grad_pos * d_pos + grad_neg * d_neg).sum(), inputs)
    return (d_pos, d_neg, *grads)


def reference_float64(student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    as64 = [None if x is None else x.double() for x in (student, teacher, negatives, grad_pos, grad_neg)]
    return distances_and_gradients(reference.feature_distances, *as64, distance, normalize)


def assert_close_to_reference(name, out, lowp, ref):
    """|out - ref| <= 2 |lowp - ref| + atol, elementwise; out, lowp in the same dtype, ref in float64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == lowp.dtype, f"{name}: dtype {out.dtype}, expected {lowp.dtype}"
    error = (out.double() - ref).abs()
    finfo = torch.finfo(out.dtype)
    # a float16 gradient of a large feature can be subnormal: one rounding step there is an absolute size
    atol = RELATIVE_ATOL[out.dtype] * ref.abs().max().item() + finfo.smallest_normal * finfo.eps
    allowed = 2 * (lowp.double() - ref).abs() + atol
    worst = (error - allowed).flatten().argmax()
    assert torch.all(error <= allowed), (
        f"{name}: |out - ref| = {error.flatten()[worst]:.3e} > allowed {allowed.flatten()[worst]:.3e} "
        f"at flat index {worst.item()} (out {out.flatten()[worst].item():.6e}, ref {ref.flatten()[worst].item():.6e})"
    )


def check_against_reference(device, student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    ops = triton_ops(device)
    args = (student, teacher, negatives, grad_pos, grad_neg, distance, normalize)
    out = distances_and_gradients(ops.feature_distances, *args)
    lowp = distances_and_gradients(resolve("reference", student.device)[1].feature_distances, *args)
    ref = reference_float64(*args)
    names = ["d_pos", "d_neg", "grad_student", "grad_teacher", "grad_negatives"]
    for name, o, l, r in zip(names, out, lowp, ref):
        assert_close_to_reference(name, o, l, r)


# --- distances and gradients against the reference -------------------------------------------


# The interpreter runs a kernel at Python speed: every option on every shape in float32; the half
# dtypes, which change only the casts on load and store, on the first shape (float64: the next tests).
@pytest.mark.parametrize(
    "device, shape, option, dtype_name",
    cases(OPTIONS, ["fp32"]) + cases(ADDRESSING_OPTIONS, ["fp16", "bf16"], shapes=slice(0, 1)),
)
def test_every_option_dtype_and_shape(device, shape, option, dtype_name, poisoned_empty):
    negatives, distance, normalize = option
    student, teacher, explicit, grad_pos, grad_neg = make_inputs(shape, negatives, DTYPES[dtype_name], device)
    check_against_reference(device, student, teacher, explicit, grad_pos, grad_neg, distance, normalize)


#: (features' layout, explicit negatives' layout when it differs)
LAYOUTS = [("channels_last", None), ("strided", None), ("contiguous", "expanded"), ("channels_last", "strided")]
LAYOUT_CASES = [
    case for case in cases(ADDRESSING_OPTIONS, LAYOUTS, shapes=slice(0, 1))
    if case.values[2][0] == "explicit" or case.values[3][1] is None  # in-batch has no negatives' layout
]


@pytest.mark.parametrize("device, shape, option, layouts", LAYOUT_CASES)
def test_non_contiguous_layouts(device, shape, option, layouts, poisoned_empty):
    """Strides are read, never assumed; expanded negatives (batch stride 0) share their rows across anchors."""
    negatives, distance, normalize = option
    layout, negatives_layout = layouts
    student, teacher, explicit, grad_pos, grad_neg = make_inputs(
        shape, negatives, torch.float32, device, layout, negatives_layout
    )
    check_against_reference(device, student, teacher, explicit, grad_pos, grad_neg, distance, normalize)


@pytest.mark.parametrize("option", ADDRESSING_OPTIONS, ids=["-".join(o) for o in ADDRESSING_OPTIONS])
@pytest.mark.parametrize("device", DEVICES)
def test_multi_block_tiling(device, option, monkeypatch, poisoned_empty):
    """Small blocks force every loop and tail: anchor, other-row, position and channel blocks, uneven channel runs."""
    monkeypatch.setattr(contrastive_kernels, "_MAX_ROW_BLOCK", 2)
    monkeypatch.setattr(contrastive_kernels, "_MAX_POSITION_BLOCK", 8)
    monkeypatch.setattr(contrastive_kernels, "_MAX_CHANNEL_BLOCK", 2)
    monkeypatch.setattr(contrastive_kernels, "_CHANNEL_TILE_ELEMENTS", 16)
    monkeypatch.setattr(kernel_utils, "_INTERPRETER_PROGRAMS", 12)  # 2 channel runs of 2 and 1 on CPU
    negatives, distance, normalize = option
    # bfloat16 without normalisation: the gradient adds up over other-row blocks in a float32 buffer, then is cast
    dtype = torch.bfloat16 if normalize == "none" else torch.float32
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((3, 3, 3, 4, 3), negatives, dtype, device)
    check_against_reference(device, student, teacher, explicit, grad_pos, grad_neg, distance, normalize)


@pytest.mark.parametrize("option", OPTIONS, ids=["-".join(o) for o in OPTIONS])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_vectors_and_ties_match_closed_form(device, option, poisoned_empty):
    """Positions whose C-vector is 0 (norm below the floor) and exact ties s == t (sign(0) = 0 for l1)."""
    negatives, distance, normalize = option
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((2, 3, 2, 3, 2), negatives, torch.float64, device)
    student[:, :, 0, 0] = 0.0
    teacher[1] = student[1]
    if explicit is not None:
        explicit[:, :, :, 1, 2] = 0.0
        explicit[0, 1] = student[0]
    d_pos, d_neg, *grads = distances_and_gradients(
        triton_ops(device).feature_distances, student, teacher, explicit, grad_pos, grad_neg, distance, normalize
    )
    ref_pos, ref_neg = reference.feature_distances(student, teacher, explicit, distance, normalize)
    torch.testing.assert_close(d_pos, ref_pos, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_neg, ref_neg, rtol=1e-12, atol=1e-14)
    on_cpu = [None if x is None else x.cpu() for x in (grad_pos, grad_neg, student, teacher, explicit)]
    expected = [g for g in distances_backward(*on_cpu, distance, normalize) if g is not None]  # closed_form is CPU-only
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


REQUIRES = [
    (device, negatives, requires)
    for device in DEVICES
    for negatives in NEGATIVES
    for requires in [("student",), ("teacher",), ("negatives",), ("student", "negatives")]
    if negatives == "explicit" or "negatives" not in requires  # in-batch negatives are the teacher
]


@pytest.mark.parametrize("device, negatives, requires", REQUIRES, ids=["-".join((d, n, *r)) for d, n, r in REQUIRES])
def test_gradients_only_where_required(device, negatives, requires, monkeypatch):
    """The backward sweeps only the inputs that require grad (a frozen teacher costs nothing)."""
    swept = []
    anchor_gradient = contrastive_kernels._anchor_gradient

    def recording_anchor_gradient(anchor, *args):
        swept.append(tuple(anchor.shape))
        return anchor_gradient(anchor, *args)

    monkeypatch.setattr(contrastive_kernels, "_anchor_gradient", recording_anchor_gradient)
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((3, 4, 3, 5, 2), negatives, torch.float32, device)
    named = {"student": student, "teacher": teacher, "negatives": explicit}
    inputs = [named[name].requires_grad_() for name in requires]
    d_pos, d_neg = triton_ops(device).feature_distances(student, teacher, explicit, "l1", "channel")
    grads = torch.autograd.grad((grad_pos * d_pos + grad_neg * d_neg).sum(), inputs)
    assert len(swept) == len(requires)
    ref = reference_float64(student, teacher, explicit, grad_pos, grad_neg, "l1", "channel")
    ref_grads = dict(zip(["student", "teacher", "negatives"], ref[2:]))
    for name, grad in zip(requires, grads):
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, negatives):
    """Default mode has no atomics: two runs agree bit for bit."""
    student, teacher, explicit, grad_pos, grad_neg = make_inputs(SHAPES[device][0], negatives, torch.float16, device)
    args = (student, teacher, explicit, grad_pos, grad_neg, "l2", "channel")
    runs = [distances_and_gradients(triton_ops(device).feature_distances, *args) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("device", DEVICES)
def test_memory_stays_linear_in_the_inputs(device, negatives, monkeypatch):
    """No buffer larger than an input: nothing of size (B, B, C, H, W), nor (B, K, C, H, W) beyond the negatives."""
    allocated = []

    def recording(allocate):
        def allocate_recorded(*args, **kwargs):
            x = allocate(*args, **kwargs)
            allocated.append(x.numel())
            return x

        return allocate_recorded

    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "empty_like", recording(torch.empty_like))
    # the second shape: on CUDA, B = 16, so a (B, B, C, H, W) buffer would be 8 times the peak allowed below
    student, teacher, explicit, grad_pos, grad_neg = make_inputs(SHAPES[device][1], negatives, torch.float32, device)
    largest_input = max(x.numel() for x in (student, teacher, explicit) if x is not None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    args = (student, teacher, explicit, grad_pos, grad_neg, "l1", "channel")
    distances_and_gradients(triton_ops(device).feature_distances, *args)
    assert allocated and max(allocated) <= largest_input
    if device == "cuda":
        # gradients, one float32 grad_hat at a time, the inputs' detached copies: a few inputs' worth, never B times one
        input_bytes = sum(x.numel() * x.element_size() for x in (student, teacher, explicit) if x is not None)
        assert torch.cuda.max_memory_allocated() - baseline <= 4 * input_bytes


# --- patch MSE and the adaptive mask ----------------------------------------------------------


@pytest.mark.parametrize(
    "device, shape, dtype_name, layout",
    cases(list(DTYPES), ["contiguous", "channels_last", "strided"], shapes=slice(0, 1)),
)
def test_patch_mse_matches_reference(device, shape, dtype_name, layout, poisoned_empty):
    batch, _, height, width, _ = shape
    generator = torch.Generator().manual_seed(1)
    images = [
        make_feature((batch, 3, height, width), DTYPES[dtype_name], device, layout, generator).abs() for _ in range(3)
    ]
    out = triton_ops(device).patch_mse(*images)
    lowp = reference.patch_mse(*images)
    ref = reference.patch_mse(*(x.double() for x in images))
    assert_close_to_reference("patch_mse", out, lowp, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_mse_mixed_dtypes_and_multi_span(device, monkeypatch):
    """Each image is cast on load (the compute dtype follows hr); uneven spans still sum every element once."""
    monkeypatch.setattr(kernel_utils, "_INTERPRETER_PROGRAMS", 5)
    monkeypatch.setattr(kernel_utils, "_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(patch_mse_kernels, "_ELEMENT_BLOCK", 16)
    generator = torch.Generator().manual_seed(2)
    sr_student = torch.rand(2, 3, 6, 7, generator=generator).to(device=device, dtype=torch.float16)
    sr_teacher = torch.rand(2, 3, 6, 7, generator=generator).to(device=device, dtype=torch.bfloat16)
    hr = torch.rand(2, 3, 6, 7, generator=generator).to(device=device)
    torch.testing.assert_close(
        triton_ops(device).patch_mse(sr_student, sr_teacher, hr), reference.patch_mse(sr_student, sr_teacher, hr)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_mask_through_public_api(device):
    generator = torch.Generator().manual_seed(3)
    hr = torch.rand(4, 3, 5, 6, generator=generator).to(device)
    sr_teacher = (hr + 0.05 * torch.randn(hr.shape, generator=generator).to(device)).clamp(0, 1)
    sr_student = (hr + torch.tensor([0.02, 0.1, 0.02, 0.1], device=device).view(-1, 1, 1, 1)).clamp(0, 1)
    for margin_db in (0.0, 3.0):
        got = facd_fast.adaptive_mask(sr_student, sr_teacher, hr, margin_db=margin_db, backend="triton")
        want = reference.adaptive_mask(sr_student, sr_teacher, hr, margin_db=margin_db)
        assert torch.equal(got, want)


# --- the public loss, custom ops, torch.compile and registration ------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device", DEVICES)
def test_contrastive_loss_through_public_api(device, reduction):
    student, teacher, _, _, _ = make_inputs((4, 3, 4, 5, 1), "in-batch", torch.float32, device)
    mask = torch.tensor([True, False, True, True], device=device)
    grads = []
    for backend in ("triton", "reference"):
        s = student.detach().requires_grad_()
        loss = facd_fast.contrastive_loss(s, teacher, mask=mask, reduction=reduction, backend=backend)
        grads.append((loss, *torch.autograd.grad(loss.sum(), s)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.all(grads[0][1][1] == 0), "a masked-out patch gets no gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake kernels and autograd registration of the three custom ops (with and without negatives)."""
    triton_ops(device)  # registers the ops
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((3, 2, 2, 3, 2), "explicit", torch.float32, device)
    torch.library.opcheck(
        torch.ops.facd_fast.triton_feature_distances,
        (student.requires_grad_(), teacher, explicit.requires_grad_(), "l1", "channel"),
    )
    torch.library.opcheck(
        torch.ops.facd_fast.triton_feature_distances_backward,
        (grad_pos, grad_neg, student.detach(), teacher, None, "l2", "none", True, False, False),
    )
    images = [torch.rand(3, 3, 2, 3, device=device) for _ in range(3)]
    torch.library.opcheck(torch.ops.facd_fast.triton_patch_mse, images)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The public loss traces into one graph through the custom ops, forward and backward (aot_eager: fast)."""
    student, teacher, explicit, _, _ = make_inputs((3, 4, 3, 3, 2), "explicit", torch.float32, device)
    mask = torch.tensor([True, False, True], device=device)

    def loss(s, t, n):
        return facd_fast.contrastive_loss(s, t, n, mask=mask, distance="l2", backend="triton")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, loss):
        s, n = student.detach().requires_grad_(), explicit.detach().requires_grad_()
        value = function(s, teacher, n)
        value.backward()
        results.append((value, s.grad, n.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_registration():
    assert "triton" in backend_names()
    triton = triton_backend.DEVICE_TYPES
    assert "cuda" in triton
    if triton_backend.INTERPRETED:
        assert "cpu" in triton
        # the interpreter runs at Python speed: auto must never choose it over the reference for CPU tensors
        assert backends._REGISTRY["triton"].priority < backends._REGISTRY["reference"].priority
    if torch.cuda.is_available() and not triton_backend.INTERPRETED:
        assert resolve("auto", torch.device("cuda"))[0] == "triton"


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(BackendUnavailable, match="triton"):
        triton_backend._load()
