"""The fused C++ CPU backend (csrc/, facd_fast.backends.cpp) against the reference.

Every case draws fresh random inputs. float32 results must match the float64
reference within 1e-5 (relative to the largest reference value); half-type
results must be at most twice as far from the float64 reference as plain torch
computing the reference in that half type, plus one rounding step of the type.
"""
import warnings

import pytest
import torch

import facd_fast
from facd_fast import backends, reference
from facd_fast.backends import BackendUnavailable, cpp, resolve

from closed_form import distances_backward

EXT = cpp.load_extension()
CAPABILITIES = ["default"] if EXT.cpu_capability() == "DEFAULT" else ["default", "auto"]


@pytest.fixture(autouse=True)
def fused_backend_for_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """Runs a test with the portable kernels and with the best ones this CPU has."""
    EXT.set_cpu_capability(request.param)
    yield request.param
    EXT.set_cpu_capability("auto")


def make_features(shape, dtype=torch.float32, layout="contiguous"):
    """Random features of `shape` (..., C, H, W) in a given memory layout, same values semantics.

    channels_last: C is the innermost dimension; sliced: every other column of
    a wider tensor, and a channel window of a deeper one (no unit stride at all).
    """
    *lead, c, h, w = shape
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(*lead, h, w, c, dtype=dtype).movedim(-1, -3)
    if layout == "sliced":
        return torch.randn(*lead, c + 2, h, 2 * w, dtype=dtype)[..., 1 : c + 1, :, ::2]
    raise ValueError(layout)


def assert_close_relative(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max|expected| elementwise (expected in float64)."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected).abs().max()
    assert error <= rtol * scale, f"max error {error:.3e} > {rtol:.0e} * {scale:.3e}"


def assert_within_half_rule(fused, torch_half, ref64):
    """|fused - ref| <= 2 |torch_half - ref| + atol, atol one rounding step of the half type."""
    atol = torch.finfo(torch_half.dtype).eps * ref64.abs().max()
    bound = 2 * (torch_half.double() - ref64).abs() + atol
    excess = (fused.double() - ref64).abs() - bound
    assert (excess <= 0).all(), f"worst excess over the bound: {excess.max():.3e}"


SHAPES = {"B3-C5-H7-W9": (3, 5, 7, 9), "B2-C4-H3-W3": (2, 4, 3, 3), "B4-C256-H3-W5": (4, 256, 3, 5)}
LAYOUTS = ["contiguous", "channels_last", "sliced"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["channel", "none"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("negatives_per_patch", [0, 3], ids=["in-batch", "K3"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_distances_and_gradients_match_reference(shape, negatives_per_patch, distance, normalize, layout, capability):
    student = make_features(shape, layout=layout).requires_grad_()
    teacher = make_features(shape, layout=layout).requires_grad_()
    negatives = None
    if negatives_per_patch:
        negatives = make_features((shape[0], negatives_per_patch, *shape[1:]), layout=layout).requires_grad_()
    inputs = [x for x in (student, teacher, negatives) if x is not None]

    d_pos, d_neg = cpp.forward(student, teacher, negatives, distance, normalize)
    as64 = [x.detach().double() for x in (student, teacher)] + [None if negatives is None else negatives.detach().double()]
    ref_pos, ref_neg = reference.feature_distances(*as64, distance, normalize)
    assert d_pos.dtype == d_neg.dtype == torch.float32
    assert_close_relative(d_pos, ref_pos)
    assert_close_relative(d_neg, ref_neg)

    grad_pos, grad_neg = torch.randn(shape[0], dtype=torch.float64), torch.randn(shape[0], dtype=torch.float64)
    fused = cpp.backward(grad_pos.float(), grad_neg.float(), *[x.detach() for x in (student, teacher)],
                         None if negatives is None else negatives.detach(), distance, normalize, True, True,
                         negatives is not None)
    expected = distances_backward(grad_pos, grad_neg, *as64, distance, normalize)
    for got, want, x in zip(fused, expected, inputs):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close_relative(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
def test_public_loss_with_every_reduction_and_mask(reduction, with_mask, negatives_per_patch):
    batch = 5
    student = make_features((batch, 6, 4, 7), layout="channels_last").requires_grad_()
    teacher = make_features((batch, 6, 4, 7)).requires_grad_()
    negatives = make_features((batch, negatives_per_patch, 6, 4, 7)).requires_grad_() if negatives_per_patch else None
    mask = torch.tensor([True, False, True, True, False]) if with_mask else None
    inputs = [x for x in (student, teacher, negatives) if x is not None]
    kwargs = dict(mask=mask, distance="l1", normalize="channel", reduction=reduction)

    loss = facd_fast.contrastive_loss(student, teacher, negatives, backend="cpp", **kwargs)
    upstream = torch.randn(loss.shape, dtype=torch.float64)
    grads = torch.autograd.grad(loss, inputs, upstream.float())

    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref = reference.contrastive_loss(*inputs64, **kwargs) if negatives is not None else \
        reference.contrastive_loss(*inputs64, None, **kwargs)
    ref_grads = torch.autograd.grad(ref, inputs64, upstream)
    assert loss.dtype == torch.float32
    assert_close_relative(loss.detach(), ref.detach())
    for got, want in zip(grads, ref_grads):
        assert_close_relative(got, want)
    if with_mask:  # a masked-out patch's student gets no gradient (its teacher still serves as a negative)
        assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_half_types_within_twice_torch_half_error(dtype, negatives_per_patch, distance):
    shape = (4, 32, 5, 6)
    student = make_features(shape, dtype, "channels_last").requires_grad_()
    teacher = make_features(shape, dtype).requires_grad_()
    negatives = make_features((4, negatives_per_patch, *shape[1:]), dtype).requires_grad_() if negatives_per_patch else None
    inputs = [x for x in (student, teacher, negatives) if x is not None]
    upstream = torch.randn(shape[0], dtype=torch.float64)

    def loss_and_grads(fn, xs, cast):
        loss = fn(xs)
        return loss, torch.autograd.grad(loss, xs, upstream.to(loss.dtype) if cast else upstream)

    with_negatives = lambda xs: (xs[2] if negatives_per_patch else None)  # noqa: E731
    fused_loss, fused_grads = loss_and_grads(
        lambda xs: facd_fast.contrastive_loss(xs[0], xs[1], with_negatives(xs), distance=distance, reduction="none",
                                              backend="cpp"), inputs, True)
    half_loss, half_grads = loss_and_grads(
        lambda xs: reference.contrastive_ratio(*reference.feature_distances(xs[0], xs[1], with_negatives(xs),
                                                                           distance, "channel"), None, 1e-6, "none"),
        inputs, True)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref_loss, ref_grads = loss_and_grads(
        lambda xs: reference.contrastive_loss(xs[0], xs[1], with_negatives(xs), distance=distance, reduction="none"),
        inputs64, False)

    assert fused_loss.dtype == dtype and half_loss.dtype == dtype
    assert_within_half_rule(fused_loss.detach(), half_loss.detach(), ref_loss.detach())
    for fused, half, ref in zip(fused_grads, half_grads, ref_grads):
        assert fused.dtype == dtype
        assert_within_half_rule(fused, half, ref)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_every_output_element_is_written(layout):
    """NaN-poisoned output buffers, in layouts the kernel must honour, come back finite and right."""
    shape, negatives_per_patch = (3, 7, 5, 6), 2
    student, teacher = make_features(shape), make_features(shape, layout=layout)
    negatives = make_features((3, negatives_per_patch, *shape[1:]))
    d_pos, d_neg = torch.full((6,), float("nan"))[::2], torch.full((3,), float("nan"))
    EXT.feature_distances_out(student, teacher, negatives, "l2", "channel", d_pos, d_neg)
    ref_pos, ref_neg = reference.feature_distances(student.double(), teacher.double(), negatives.double(), "l2", "channel")
    assert_close_relative(d_pos, ref_pos)
    assert_close_relative(d_neg, ref_neg)

    grads = [make_features(x.shape, layout=layout).fill_(float("nan")) for x in (student, teacher, negatives)]
    grad_pos, grad_neg = torch.randn(3), torch.randn(3)
    EXT.feature_distances_backward_out(grad_pos, grad_neg, student, teacher, negatives, "l2", "channel", *grads)
    expected = distances_backward(grad_pos.double(), grad_neg.double(), student.double(), teacher.double(),
                                  negatives.double(), "l2", "channel")
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        assert_close_relative(got, want)

    images = [make_features((3, 3, 9, 11), layout=layout).uniform_() for _ in range(3)]
    mse = torch.full((3, 2), float("nan"))
    EXT.patch_mse_out(*images, mse)
    assert_close_relative(mse, reference.patch_mse(*[x.double() for x in images]))


def test_a_larger_call_leaves_nothing_behind():
    """Staging buffers come from the heap and may hold what an earlier, larger call
    left there: its NaNs must not reach a smaller call with partial tiles and padding."""
    poison = torch.full((4, 64, 9, 9), float("nan"))
    grad = torch.empty_like(poison)
    EXT.feature_distances_backward_out(torch.ones(4), torch.ones(4), poison, poison, None, "l1", "channel",
                                       grad, grad.clone(), None)
    shape = (3, 5, 7, 9)
    student, teacher = make_features(shape), make_features(shape)
    d_pos, d_neg = cpp.forward(student, teacher, None, "l1", "channel")
    ref_pos, ref_neg = reference.feature_distances(student.double(), teacher.double(), None, "l1", "channel")
    assert_close_relative(d_pos, ref_pos)
    assert_close_relative(d_neg, ref_neg)
    grad_pos, grad_neg = torch.randn(3), torch.randn(3)
    fused = cpp.backward(grad_pos, grad_neg, student, teacher, None, "l1", "channel", True, True, False)
    expected = distances_backward(grad_pos.double(), grad_neg.double(), student.double(), teacher.double(), None,
                                  "l1", "channel")
    for got, want in zip(fused[:2], expected[:2]):
        assert_close_relative(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_patch_mse_and_adaptive_mask_match_reference(dtype):
    hr = make_features((6, 3, 17, 13), dtype).uniform_()
    sr_student = (hr + 0.1 * torch.randn_like(hr)).clamp(0, 1)
    sr_teacher = (hr + 0.1 * torch.rand(6, 1, 1, 1, dtype=dtype) * torch.randn_like(hr)).clamp(0, 1)
    sr_student = sr_student.contiguous(memory_format=torch.channels_last)
    mse = facd_fast.patch_mse(sr_student, sr_teacher, hr, backend="cpp")
    assert mse.dtype == reference.compute_dtype(dtype)
    assert_close_relative(mse, reference.patch_mse(sr_student.double(), sr_teacher.double(), hr.double()))
    mask = facd_fast.adaptive_mask(sr_student, sr_teacher, hr, margin_db=0.5, backend="cpp")
    assert torch.equal(mask, reference.adaptive_mask(sr_student, sr_teacher, hr, margin_db=0.5))


@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
def test_bitwise_deterministic_for_any_thread_count(negatives_per_patch):
    shape = (8, 64, 12, 12)
    student, teacher = make_features(shape), make_features(shape, layout="channels_last")
    negatives = make_features((8, negatives_per_patch, *shape[1:])) if negatives_per_patch else None
    grad_pos, grad_neg = torch.randn(8), torch.randn(8)
    threads = torch.get_num_threads()

    def run():
        distances = cpp.forward(student, teacher, negatives, "l1", "channel")
        grads = cpp.backward(grad_pos, grad_neg, student, teacher, negatives, "l1", "channel", True, True, True)
        return [*distances, *grads]

    try:
        runs = []
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_gradients_only_for_inputs_that_need_them():
    student = make_features((3, 4, 5, 5)).requires_grad_()
    teacher, negatives = make_features((3, 4, 5, 5)), make_features((3, 2, 4, 5, 5))
    facd_fast.contrastive_loss(student, teacher, negatives, backend="cpp").backward()
    assert student.grad is not None and teacher.grad is None and negatives.grad is None

    g_student, g_teacher, g_negatives = cpp.backward(
        torch.randn(3), torch.randn(3), student.detach(), teacher, negatives, "l1", "channel", False, True, False
    )
    assert g_student.numel() == 0 and g_negatives.numel() == 0 and g_teacher.shape == teacher.shape


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
def test_gradcheck_in_float64(distance, negatives_per_patch):
    shape = (3, 4, 2, 3)
    inputs = [make_features(shape, torch.float64).requires_grad_(), make_features(shape, torch.float64).requires_grad_()]
    if negatives_per_patch:
        inputs.append(make_features((3, negatives_per_patch, *shape[1:]), torch.float64).requires_grad_())

    def loss(*xs):
        return facd_fast.contrastive_loss(*xs, distance=distance, reduction="none", backend="cpp")

    assert torch.autograd.gradcheck(loss, inputs)


def _ops():
    backends._load("cpp")
    return torch.ops.facd_fast


@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
def test_opcheck_custom_ops(negatives_per_patch):
    ops = _ops()
    shape = (3, 4, 3, 5)
    student, teacher = make_features(shape, torch.float64), make_features(shape, torch.float64, "channels_last")
    negatives = make_features((3, negatives_per_patch, *shape[1:]), torch.float64) if negatives_per_patch else None
    args = (student.requires_grad_(), teacher.requires_grad_(),
            None if negatives is None else negatives.requires_grad_(), "l1", "channel")
    torch.library.opcheck(ops.cpp_feature_distances.default, args)
    backward_args = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
                     student.detach(), teacher.detach(), None if negatives is None else negatives.detach(),
                     "l2", "none", True, False, negatives is not None)
    torch.library.opcheck(ops.cpp_feature_distances_backward.default, backward_args)
    images = [torch.rand(2, 3, 8, 8) for _ in range(3)]
    torch.library.opcheck(ops.cpp_patch_mse.default, tuple(images))


def test_compiles_fullgraph_with_the_fused_op():
    torch._dynamo.reset()
    student = make_features((4, 16, 6, 6)).requires_grad_()
    teacher = make_features((4, 16, 6, 6))
    mask = torch.tensor([True, True, False, True])

    def step(s, t, m):
        return facd_fast.contrastive_loss(s, t, mask=m, distance="l1")

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(student, teacher, mask)
    (grad,) = torch.autograd.grad(loss, student)
    eager_loss = step(student, teacher, mask)
    (eager_grad,) = torch.autograd.grad(eager_loss, student)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-9)


def test_auto_picks_cpp_on_cpu():
    assert resolve("auto", torch.device("cpu"))[0] == "cpp"
    assert "cpp" in facd_fast.available_backends()


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch):
    """Neither an installed facd_fast._C nor a working compiler: auto warns once and runs the reference."""
    real_import = cpp.importlib.import_module

    def import_without_extension(name, *args):
        if name == "facd_fast._C":
            raise ImportError("not built")
        return real_import(name, *args)

    def failing_build(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp, "_extension", None)
    monkeypatch.setattr(cpp.importlib, "import_module", import_without_extension)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    monkeypatch.setattr(backends, "_LOADED", {name: ops for name, ops in backends._LOADED.items() if name != "cpp"})
    monkeypatch.setattr(backends, "_FAILED", {})
    monkeypatch.setattr(backends, "_warned_fallback", set())

    with pytest.raises(BackendUnavailable, match="c\\+\\+: command not found"):
        cpp.load_extension()
    student, teacher = make_features((3, 4, 5, 5)), make_features((3, 4, 5, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [facd_fast.contrastive_loss(student, teacher) for _ in range(3)]
    fallback_warnings = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallback_warnings) == 1 and issubclass(fallback_warnings[0].category, RuntimeWarning)
    assert resolve("auto", student.device)[0] == "reference"
    expected = reference.contrastive_loss(student, teacher)
    for loss in losses:
        torch.testing.assert_close(loss, expected)


def test_kernel_errors_name_the_argument():
    student = make_features((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="in-batch negatives need B >= 2"):
        EXT.feature_distances_out(student[:1], student[:1], None, "l1", "channel", torch.empty(1), torch.empty(1))
    with pytest.raises(RuntimeError, match="d_pos must have shape"):
        EXT.feature_distances_out(student, student, None, "l1", "channel", torch.empty(3), torch.empty(2))
    with pytest.raises(RuntimeError, match="distance must be 'l1' or 'l2'"):
        EXT.feature_distances_out(student, student, None, "l3", "channel", torch.empty(2), torch.empty(2))
    with pytest.raises(TypeError, match="teacher must have the student's dtype"):
        EXT.feature_distances_out(student, student.double(), None, "l1", "none", torch.empty(2), torch.empty(2))
    with pytest.raises(RuntimeError, match="must not have overlapping elements"):
        EXT.feature_distances_backward_out(torch.ones(2), torch.ones(2), student, student, None, "l1", "none",
                                           torch.empty(1).expand(2, 3, 4, 4), None, None)
