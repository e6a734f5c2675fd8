"""The backend contract: every backend against the float64 reference, one suite for all.

Backends (``KERNELS``): the plain-PyTorch ``reference``; the C++ kernels of
the ``facd_fast`` ops on CPU tensors, once per instruction set this CPU runs
(portable, AVX2, AVX-512: an AVX-512 host also runs the AVX2 kernels); the
Triton kernels, compiled on CUDA tensors or, without a GPU, in Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1) at tiny
shapes. What only one backend has (instruction-set choice, thread counts,
tiling, the interpreter, fallback) is in test_cpp_kernels.py and
test_triton_kernels.py.

Accuracy rule (flash-attention's): |out - ref| <= 2 |lowp - ref| + atol, with
ref the float64 reference, lowp the reference computed in the kernel's own
precision, atol a fraction (by kernel set and dtype) of the largest |ref|.
Outputs are poisoned: with ``torch.use_deterministic_algorithms(True)`` every
tensor a kernel allocates (in Python or C++) starts as NaN, so an element no
kernel writes cannot pass.
"""
import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import facd_fast
from facd_fast import api, ops, reference
from facd_fast.definition import compute_dtype

from closed_form import distances_backward


@dataclass(frozen=True)
class Kernel:
    """One backend under test: ``backend=`` name, device, and for cpp the instruction set forced."""

    backend: str
    device: str
    capability: Optional[str] = None

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.backend, self.capability or self.device) if x)

    @property
    def interpreted(self) -> bool:
        return self.backend == ops.TRITON and self.device == "cpu"

    @property
    def family(self) -> str:
        """Which shapes and tolerances apply."""
        return "triton-interpreter" if self.interpreted else self.backend


def _cpu_capabilities():
    """The instruction sets of the C++ kernels this CPU runs."""
    names = []
    for name in ("default", "avx2", "avx512"):
        try:
            ops.set_cpu_capability(name)
        except RuntimeError:
            continue
        names.append(name)
    ops.set_cpu_capability("auto")
    return names


def _kernels():
    kernels = [Kernel("reference", "cpu")]
    if ops.CPP not in ops.UNAVAILABLE:
        kernels += [Kernel(ops.CPP, "cpu", name) for name in _cpu_capabilities()]
    if ops.TRITON not in ops.UNAVAILABLE and ops.INTERPRETED:
        kernels.append(Kernel(ops.TRITON, "cpu"))
    if torch.cuda.is_available():
        kernels += [Kernel("reference", "cuda")]
        if ops.TRITON not in ops.UNAVAILABLE and not ops.INTERPRETED:
            kernels.append(Kernel(ops.TRITON, "cuda"))
    return kernels


KERNELS = _kernels()
FUSED = [k for k in KERNELS if k.backend != "reference"]

#: (B, C, H, W, K) by family: odd and prime sizes, a wide C, a single pixel; tiny ones for the interpreter.
SHAPES = {
    "reference": [(3, 5, 7, 9, 3), (2, 2, 1, 1, 1)],
    ops.CPP: [(3, 5, 7, 9, 3), (2, 4, 3, 3, 3), (4, 256, 3, 5, 3), (2, 2, 1, 1, 1)],
    "triton-interpreter": [(3, 5, 3, 4, 2), (4, 8, 6, 5, 2), (2, 2, 1, 1, 1)],
    ops.TRITON: [(5, 37, 13, 17, 3), (16, 64, 24, 24, 8), (8, 256, 12, 12, 4)],
}
#: atol as a fraction of the largest |ref|, by family and dtype of the compared result.
RELATIVE_ATOL = {
    "reference": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    # the C++ kernels sum in float64: one rounding step of the result's dtype
    ops.CPP: {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: torch.finfo(torch.float16).eps,
              torch.bfloat16: torch.finfo(torch.bfloat16).eps},
    "triton-interpreter": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
    ops.TRITON: {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
NEGATIVES = ("in-batch", "explicit")
OPTIONS = list(itertools.product(NEGATIVES, ("l1", "l2"), ("channel", "none")))
#: Addressing does not depend on the distance: each (negatives, normalize) once, both distances.
ADDRESSING = [("in-batch", "l1", "channel"), ("in-batch", "l2", "none"), ("explicit", "l2", "channel"),
              ("explicit", "l1", "none")]
#: (features' layout, explicit negatives' layout when it differs)
LAYOUTS = [("contiguous", None), ("channels_last", None), ("strided", None), ("contiguous", "expanded"),
           ("channels_last", "strided")]


def shape_id(shape):
    return "B{}-C{}-H{}-W{}-K{}".format(*shape)


def cases(*axes, kernels=KERNELS, shapes=slice(None)):
    """pytest params: each kernel, its shapes (those ``shapes`` selects), every combination of the axes' values."""
    params = []
    for kernel in kernels:
        for shape in SHAPES[kernel.family][shapes]:
            for combo in itertools.product(*axes):
                ids = [kernel.id, shape_id(shape)] + ["-".join(filter(None, v)) if isinstance(v, tuple) else v
                                                      for v in combo]
                params.append(pytest.param(kernel, shape, *combo, id="-".join(ids), marks=marks(kernel)))
    return params


def marks(kernel):
    """``pytest -m triton`` selects the Triton kernels' cases."""
    return [pytest.mark.triton] if kernel.backend == ops.TRITON else []


def kernel_params(kernels):
    return [pytest.param(kernel, id=kernel.id, marks=marks(kernel)) for kernel in kernels]


@pytest.fixture
def selected(request):
    """Selects the kernel of the test's ``kernel`` parameter; puts the portable choices back afterwards."""
    kernel = request.node.callspec.params["kernel"]
    if kernel.capability is not None:
        ops.set_cpu_capability(kernel.capability)
    yield kernel
    if kernel.capability is not None:
        ops.set_cpu_capability("auto")


@pytest.fixture
def poisoned():
    """Every tensor allocated while the test runs (torch.empty, at::empty_like in C++...) starts as NaN."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


# --- input builders -------------------------------------------------------------------------


def make_feature(shape, dtype, device, layout, generator):
    """A random (..., C, H, W) tensor laid out as asked, built without a copy that would undo the layout.

    ``channels_last``: C innermost; ``strided``: every other column of a wider
    tensor and a channel window of a deeper one (no unit stride at all);
    ``expanded``: one block shared along dim 0 (batch stride 0).
    """
    *outer, channels, height, width = shape
    if layout == "channels_last":
        base = torch.randn(*outer, height, width, channels, generator=generator)
        return base.to(device=device, dtype=dtype).movedim(-1, -3)
    if layout == "strided":
        base = torch.randn(*outer, channels + 2, height, 2 * width, generator=generator)
        return base.to(device=device, dtype=dtype)[..., 1 : channels + 1, :, ::2]
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
    compute = compute_dtype(dtype)
    grad_pos = torch.randn(batch, generator=generator).to(device=device, dtype=compute)
    grad_neg = torch.randn(batch, generator=generator).to(device=device, dtype=compute)
    return student, teacher, explicit, grad_pos, grad_neg


def make_images(batch, height, width, dtype, device, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    return [make_feature((batch, 3, height, width), dtype, device, layout, generator).abs() for _ in range(3)]


# --- the accuracy rule ------------------------------------------------------------------------


def distances_and_gradients(backend, student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    """(d_pos, d_neg, gradients of sum(grad_pos d_pos + grad_neg d_neg) w.r.t. every feature input)."""
    inputs = [x.detach().requires_grad_() for x in (student, teacher, negatives) if x is not None]
    d_pos, d_neg = api.feature_distances(*inputs[:2], inputs[2] if negatives is not None else None, distance,
                                         normalize, backend)
    grads = torch.autograd.grad((grad_pos * d_pos + grad_neg * d_neg).sum(), inputs)
    return (d_pos, d_neg, *grads)


def reference_float64(student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    as64 = [None if x is None else x.double() for x in (student, teacher, negatives, grad_pos, grad_neg)]
    return distances_and_gradients("reference", *as64, distance, normalize)


def assert_close_to_reference(kernel, name, out, lowp, ref):
    """|out - ref| <= 2 |lowp - ref| + atol, elementwise; out, lowp in the same dtype, ref in float64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.dtype == lowp.dtype, f"{name}: dtype {out.dtype}, expected {lowp.dtype}"
    error = (out.double() - ref).abs()
    finfo = torch.finfo(out.dtype)
    # a float16 gradient of a large feature can be subnormal: one rounding step there is an absolute size
    atol = RELATIVE_ATOL[kernel.family][out.dtype] * ref.abs().max().item() + finfo.smallest_normal * finfo.eps
    allowed = 2 * (lowp.double() - ref).abs() + atol
    worst = (error - allowed).flatten().argmax()
    assert torch.all(error <= allowed), (
        f"{name}: |out - ref| = {error.flatten()[worst]:.3e} > allowed {allowed.flatten()[worst]:.3e} "
        f"at flat index {worst.item()} (out {out.flatten()[worst].item():.6e}, ref {ref.flatten()[worst].item():.6e})"
    )


def check_against_reference(kernel, student, teacher, negatives, grad_pos, grad_neg, distance, normalize):
    args = (student, teacher, negatives, grad_pos, grad_neg, distance, normalize)
    out = distances_and_gradients(kernel.backend, *args)
    lowp = distances_and_gradients("reference", *args)
    ref = reference_float64(*args)
    names = ["d_pos", "d_neg", "grad_student", "grad_teacher", "grad_negatives"]
    for name, o, l, r in zip(names, out, lowp, ref):  # in-batch: no grad_negatives
        assert_close_to_reference(kernel, name, o, l, r)
    for x, g in zip([x for x in (student, teacher, negatives) if x is not None], out[2:], strict=True):
        assert g.dtype == x.dtype


# --- distances and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("kernel, shape, option", cases(OPTIONS))
def test_every_option_and_shape(kernel, shape, option, selected, poisoned):
    negatives, distance, normalize = option
    check_against_reference(kernel, *make_inputs(shape, negatives, torch.float32, kernel.device), distance, normalize)


@pytest.mark.parametrize("kernel, shape, option, layouts", [
    case for case in cases(ADDRESSING, LAYOUTS[1:], shapes=slice(0, 1))
    if case.values[2][0] == "explicit" or case.values[3][1] is None  # in-batch has no negatives' layout
])
def test_non_contiguous_layouts(kernel, shape, option, layouts, selected, poisoned):
    """Strides are read, never assumed; expanded negatives (batch stride 0) share their rows across anchors."""
    negatives, distance, normalize = option
    inputs = make_inputs(shape, negatives, torch.float32, kernel.device, *layouts)
    check_against_reference(kernel, *inputs, distance, normalize)


@pytest.mark.parametrize("kernel, shape, option, dtype_name", cases(ADDRESSING, ["fp16", "bf16", "fp64"],
                                                                    shapes=slice(0, 1)))
def test_half_and_double_types(kernel, shape, option, dtype_name, selected, poisoned):
    """Half inputs are computed in float32 and give float32 distances, their gradients in the half type."""
    negatives, distance, normalize = option
    inputs = make_inputs(shape, negatives, DTYPES[dtype_name], kernel.device, "channels_last")
    check_against_reference(kernel, *inputs, distance, normalize)


@pytest.mark.parametrize("kernel, shape, option", cases(OPTIONS, shapes=slice(0, 1)))
def test_zero_vectors_and_ties_match_closed_form(kernel, shape, option, selected, poisoned):
    """Positions whose C-vector is 0 (norm below the floor) and exact ties s == t (sign(0) = 0 for l1)."""
    negatives, distance, normalize = option
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((2, 3, 2, 3, 2), negatives, torch.float64,
                                                                 kernel.device)
    student[:, :, 0, 0] = 0.0
    teacher[1] = student[1]
    if explicit is not None:
        explicit[:, :, :, 1, 2] = 0.0
        explicit[0, 1] = student[0]
    d_pos, d_neg, *grads = distances_and_gradients(
        kernel.backend, student, teacher, explicit, grad_pos, grad_neg, distance, normalize
    )
    ref_pos, ref_neg = reference.feature_distances(student, teacher, explicit, distance, normalize)
    torch.testing.assert_close(d_pos, ref_pos, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_neg, ref_neg, rtol=1e-12, atol=1e-14)
    on_cpu = [None if x is None else x.cpu() for x in (grad_pos, grad_neg, student, teacher, explicit)]
    expected = [g for g in distances_backward(*on_cpu, distance, normalize) if g is not None]  # closed_form: CPU only
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)


REQUIRES = [("student",), ("teacher",), ("negatives",), ("student", "negatives"), ("student", "teacher", "negatives")]


@pytest.mark.parametrize("negatives, requires", [
    (negatives, requires) for negatives in NEGATIVES for requires in REQUIRES
    if negatives == "explicit" or "negatives" not in requires  # in-batch negatives are the teacher
])
@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
def test_gradients_only_for_inputs_that_need_them(kernel, negatives, requires, selected):
    """Inputs that do not require grad get none (a frozen teacher costs nothing); the others the right one."""
    inputs = make_inputs((3, 4, 3, 5, 2), negatives, torch.float32, kernel.device)
    results = []
    for backend, cast in ((kernel.backend, lambda x: x), ("reference", lambda x: x.double())):
        student, teacher, explicit = (None if x is None else cast(x).detach() for x in inputs[:3])
        named = {"student": student, "teacher": teacher, "negatives": explicit}
        for name in requires:
            named[name].requires_grad_()
        facd_fast.contrastive_loss(student, teacher, explicit, reduction="sum", backend=backend).backward()
        for name, x in named.items():
            if x is not None:
                assert (x.grad is not None) == (name in requires), f"{backend}: {name}"
        results.append([named[name].grad for name in requires])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_deterministic(kernel, negatives, selected):
    """No atomics: two runs agree bit for bit."""
    inputs = make_inputs(SHAPES[kernel.family][0], negatives, torch.float16, kernel.device)
    runs = [distances_and_gradients(kernel.backend, *inputs, "l2", "channel") for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_gradcheck_in_float64(kernel, distance, negatives, selected):
    shape = (2, 2, 1, 2, 1) if kernel.interpreted else (3, 4, 2, 3, 2)
    student, teacher, explicit, _, _ = make_inputs(shape, negatives, torch.float64, kernel.device)
    inputs = [x.requires_grad_() for x in (student, teacher, explicit) if x is not None]

    def loss(*xs):
        return facd_fast.contrastive_loss(*xs, distance=distance, reduction="none", backend=kernel.backend)

    assert torch.autograd.gradcheck(loss, inputs)


# --- the public loss --------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_public_loss_with_every_reduction_and_mask(kernel, reduction, with_mask, negatives, selected):
    student, teacher, explicit, _, _ = make_inputs((5, 6, 4, 7, 2), negatives, torch.float32, kernel.device,
                                                   "channels_last")
    mask = torch.tensor([True, False, True, True, False], device=kernel.device) if with_mask else None
    inputs = [x.requires_grad_() for x in (student, teacher, explicit) if x is not None]
    kwargs = dict(mask=mask, distance="l1", normalize="channel", reduction=reduction)
    loss = facd_fast.contrastive_loss(student, teacher, explicit, backend=kernel.backend, **kwargs)
    upstream = torch.randn(loss.shape, dtype=torch.float64, device=kernel.device)
    grads = torch.autograd.grad(loss, inputs, upstream.float())

    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref = reference.contrastive_loss(*inputs64[:2], inputs64[2] if explicit is not None else None, **kwargs)
    ref_grads = torch.autograd.grad(ref, inputs64, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale)
    if with_mask:  # a masked-out patch's student gets no gradient (its teacher still serves as a negative)
        assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
def test_public_loss_keeps_the_half_dtype(kernel, dtype_name, selected):
    dtype = DTYPES[dtype_name]
    student, teacher, _, _, _ = make_inputs((4, 8, 3, 5, 1), "in-batch", dtype, kernel.device)
    student.requires_grad_()
    loss = facd_fast.contrastive_loss(student, teacher, reduction="none", backend=kernel.backend)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    ref = reference.contrastive_loss(student.detach().double(), teacher.double(), reduction="none")
    half = reference.contrastive_loss(student.detach(), teacher, reduction="none")
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close_to_reference(kernel, "loss", loss.detach(), half, ref)


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("option", OPTIONS, ids=["-".join(o) for o in OPTIONS])
def test_masked_patch_gets_exactly_zero_gradient(kernel, option, selected):
    """A masked-out patch's student feature (NaN and Inf here) is never read: its gradient is exactly 0, and the
    loss and every other gradient are those of the same batch with finite values in its place."""
    negatives, distance, normalize = option
    clean, teacher, explicit, _, _ = make_inputs((4, 3, 2, 3, 2), negatives, torch.float64, kernel.device)
    mask = torch.tensor([True, False, True, False], device=kernel.device)
    poisoned_student = clean.clone()
    poisoned_student[1] = float("nan")
    poisoned_student[3, 0, 0, 0] = float("inf")

    def loss_and_grads(student):
        inputs = [x.detach().requires_grad_() for x in (student, teacher, explicit) if x is not None]
        loss = facd_fast.contrastive_loss(*inputs[:2], inputs[2] if explicit is not None else None, mask=mask,
                                          distance=distance, normalize=normalize, reduction="sum",
                                          backend=kernel.backend)
        return loss, torch.autograd.grad(loss, inputs)

    loss, grads = loss_and_grads(poisoned_student)
    clean_loss, clean_grads = loss_and_grads(clean)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    torch.testing.assert_close(loss, clean_loss, rtol=1e-12, atol=0)
    for got, want in zip(grads, clean_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_backward_twice_or_after_an_in_place_change_behaves_as_torch_losses(kernel, distance, selected):
    """A second backward raises (a retained graph gives the same gradient again); a backward after an input
    was changed in place raises or gives the gradient of the values the forward saw. Never a silent wrong result."""
    student, teacher, _, _, _ = make_inputs((4, 8, 3, 5, 1), "in-batch", torch.float32, kernel.device)
    student.requires_grad_()
    loss = facd_fast.contrastive_loss(student, teacher, distance=distance, backend=kernel.backend)
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (again,) = torch.autograd.grad(loss, student, retain_graph=True)
    assert torch.equal(first, again)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    for changed in ("student", "teacher"):
        leaf = student.detach().clone().requires_grad_()
        features = {"student": leaf * 1, "teacher": teacher.clone()}  # non-leaf copies, changeable in place
        loss = facd_fast.contrastive_loss(features["student"], features["teacher"], distance=distance,
                                          backend=kernel.backend)
        with torch.no_grad():
            features[changed].add_(1.0)
        try:
            loss.backward()
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
        else:  # the reference keeps no reference to a teacher that needs no gradient: its own copies
            assert kernel.backend == "reference" and changed == "teacher"
            torch.testing.assert_close(leaf.grad, first)
    if kernel.backend != "reference":  # the ops save every input, so any change is caught
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            t = teacher.clone()
            loss = facd_fast.contrastive_loss(student, t, distance=distance, backend=kernel.backend)
            t.add_(1.0)
            loss.backward()


# --- patch MSE and the adaptive mask ----------------------------------------------------------


@pytest.mark.parametrize("kernel, shape, dtype_name, layout", cases(list(DTYPES), ["contiguous", "channels_last",
                                                                                   "strided"], shapes=slice(0, 1)))
def test_patch_mse_matches_reference(kernel, shape, dtype_name, layout, selected, poisoned):
    batch, _, height, width, _ = shape
    images = make_images(batch, height, width, DTYPES[dtype_name], kernel.device, layout, seed=1)
    out = facd_fast.patch_mse(*images, backend=kernel.backend)
    assert out.dtype == compute_dtype(DTYPES[dtype_name]) and out.shape == (batch, 2)
    lowp = reference.patch_mse(*images)
    ref = reference.patch_mse(*(x.double() for x in images))
    assert_close_to_reference(kernel, "patch_mse", out, lowp, ref)


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
def test_patch_mse_reads_each_image_in_its_own_dtype(kernel, selected):
    """Each image is cast on load; the compute dtype follows hr."""
    generator = torch.Generator().manual_seed(2)
    sr_student = torch.rand(2, 3, 6, 7, generator=generator).to(device=kernel.device, dtype=torch.float16)
    sr_teacher = torch.rand(2, 3, 6, 7, generator=generator).to(device=kernel.device, dtype=torch.bfloat16)
    hr = torch.rand(2, 3, 6, 7, generator=generator).to(device=kernel.device)
    torch.testing.assert_close(facd_fast.patch_mse(sr_student, sr_teacher, hr, backend=kernel.backend),
                               reference.patch_mse(sr_student, sr_teacher, hr))


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "fp64"])
def test_adaptive_mask_matches_reference(kernel, dtype_name, selected):
    generator = torch.Generator().manual_seed(3)
    dtype = DTYPES[dtype_name]
    hr = torch.rand(6, 3, 5, 6, generator=generator).to(kernel.device, dtype)
    sr_teacher = (hr + 0.05 * torch.randn(hr.shape, generator=generator).to(kernel.device, dtype)).clamp(0, 1)
    noise = torch.tensor([0.02, 0.1, 0.02, 0.1, 0.05, 0.0], device=kernel.device, dtype=dtype).view(-1, 1, 1, 1)
    sr_student = (hr + noise).clamp(0, 1).contiguous(memory_format=torch.channels_last)
    for margin_db in (0.0, 0.5, 3.0):
        got = facd_fast.adaptive_mask(sr_student, sr_teacher, hr, margin_db=margin_db, backend=kernel.backend)
        want = reference.adaptive_mask(sr_student, sr_teacher, hr, margin_db=margin_db)
        assert got.dtype == torch.bool and torch.equal(got, want)


# --- the ops: opcheck and torch.compile -------------------------------------------------------


@pytest.mark.parametrize("kernel", kernel_params(FUSED))
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_opcheck(kernel, negatives, selected):
    """Schema, fake kernel and autograd registration of each op, with this device's kernel."""
    ops.use_kernels(kernel.backend, kernel.device)
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((3, 2, 2, 3, 2), negatives, torch.float64,
                                                                 kernel.device, "channels_last")
    for keep_state in (False, True):  # in-batch l1 with keep_state saves its sign sums
        torch.library.opcheck(
            torch.ops.facd_fast.feature_distances.default,
            (student.requires_grad_(), teacher.requires_grad_(),
             None if explicit is None else explicit.requires_grad_(), "l1", "channel", keep_state),
        )
    for distance, normalize in (("l2", "none"), ("l1", "channel")):
        saved = torch.ops.facd_fast.feature_distances(student, teacher, explicit, distance, normalize, True)[2]
        assert saved.shape == ((2, *student.shape) if distance == "l1" and explicit is None else (0,))
        torch.library.opcheck(
            torch.ops.facd_fast.feature_distances_backward.default,
            (grad_pos, grad_neg, student.detach(), teacher.detach(), None if explicit is None else explicit.detach(),
             saved, distance, normalize, [True, False, explicit is not None]),
        )
    images = make_images(3, 2, 3, torch.float32, kernel.device, "contiguous", seed=4)
    torch.library.opcheck(torch.ops.facd_fast.patch_mse.default, tuple(images))


@pytest.mark.parametrize("kernel", kernel_params(KERNELS))
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_compile_fullgraph(kernel, negatives, selected):
    """The loss of a training step, mask included, compiles into one graph, forward and backward.

    The interpreter and the reference use aot_eager (fast); the C++ and CUDA kernels Inductor.
    """
    torch._dynamo.reset()
    student, teacher, explicit, _, _ = make_inputs((4, 6, 3, 3, 2), negatives, torch.float32, kernel.device)
    mask = torch.tensor([True, False, True, True], device=kernel.device)

    # in-batch: l1, whose forward keeps its sign sums for the backward; explicit: l2
    distance = "l1" if explicit is None else "l2"

    def loss(s, t, n):
        return facd_fast.contrastive_loss(s, t, n, mask=mask, distance=distance, backend=kernel.backend)

    loss(student, teacher, explicit)  # an eager call first: it selects the kernels (see ops.use_kernels)
    compiler = "aot_eager" if kernel.interpreted or kernel.backend == "reference" else "inductor"
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    results = []
    for function in (compiled, loss):
        s = student.detach().requires_grad_()
        value = function(s, teacher, explicit)
        value.backward()
        results.append((value, s.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
