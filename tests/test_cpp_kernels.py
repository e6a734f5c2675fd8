"""What only the C++ CPU kernels have: instruction-set choice, thread counts, staging buffers,
their own argument errors, and the fallback when the extension cannot load.

Their results against the reference are in test_ops.py (the contract suite),
run once per instruction set this CPU has.
"""
import warnings

import pytest
import torch
import torch.utils.cpp_extension

import facd_fast
from facd_fast import api, ops, reference

from closed_form import distances_backward
from test_ops import make_feature

pytestmark = pytest.mark.skipif(ops.CPP in ops.UNAVAILABLE, reason="the C++ extension is not available")

NOTHING_SAVED = torch.empty(0, dtype=torch.int8)


@pytest.fixture(autouse=True)
def cpp_kernels_serve_cpu_tensors():
    """These tests call the ops directly: the C++ kernels must serve CPU tensors, whatever an earlier
    ``backend="triton"`` call under the interpreter registered for the CPU key (process-wide)."""
    ops.use_kernels(ops.CPP, "cpu")


def features(shape, layout="contiguous", dtype=torch.float32, seed=0):
    return make_feature(shape, dtype, "cpu", layout, torch.Generator().manual_seed(seed))


def assert_close_relative(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max|expected| elementwise (expected in float64)."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected).abs().max()
    assert error <= rtol * scale, f"max error {error:.3e} > {rtol:.0e} * {scale:.3e}"


def test_auto_picks_the_cpp_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    assert api.resolve_backend("auto", "cpu") == "cpp"
    assert "cpp" in facd_fast.available_backends()


def test_instruction_sets_can_be_forced():
    """The best instruction set by default; each one this CPU runs when forced (AVX2 on an AVX-512 host too)."""
    best = ops.cpu_capability()
    assert best in ("DEFAULT", "AVX2", "AVX512")
    runnable = ["default"] + {"DEFAULT": [], "AVX2": ["avx2"], "AVX512": ["avx2", "avx512"]}[best]
    try:
        for name in runnable:
            ops.set_cpu_capability(name)
            assert ops.cpu_capability() == name.upper()
    finally:
        ops.set_cpu_capability("auto")
    assert ops.cpu_capability() == best
    with pytest.raises(RuntimeError, match="cpu capability must be"):
        ops.set_cpu_capability("sse9")
    if best != "AVX512":
        with pytest.raises(RuntimeError, match="cannot run the avx512 kernels"):
            ops.set_cpu_capability("avx512")


@pytest.mark.parametrize("negatives_per_patch", [0, 2], ids=["in-batch", "K2"])
def test_bitwise_deterministic_for_any_thread_count(negatives_per_patch):
    shape = (8, 64, 12, 12)
    student, teacher = features(shape), features(shape, "channels_last", seed=1)
    negatives = features((8, negatives_per_patch, *shape[1:]), seed=2) if negatives_per_patch else None
    grad_pos, grad_neg = torch.randn(8), torch.randn(8)
    threads = torch.get_num_threads()

    def run():
        d_pos, d_neg, saved = torch.ops.facd_fast.feature_distances(student, teacher, negatives, "l1", "channel",
                                                                    True)
        grads = torch.ops.facd_fast.feature_distances_backward(
            grad_pos, grad_neg, student, teacher, negatives, saved, "l1", "channel", [True, True, negatives_per_patch > 0]
        )
        return [d_pos, d_neg, saved, *grads]

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


def test_a_larger_call_leaves_nothing_behind():
    """Staging buffers come from the heap and may hold what an earlier, larger call
    left there: its NaNs must not reach a smaller call with partial tiles and padding."""
    poison = torch.full((4, 64, 9, 9), float("nan"))
    torch.ops.facd_fast.feature_distances_backward(torch.ones(4), torch.ones(4), poison, poison, None, NOTHING_SAVED,
                                                   "l1", "channel", [True, True, False])
    shape = (3, 5, 7, 9)
    student, teacher = features(shape), features(shape, seed=1)
    d_pos, d_neg, saved = torch.ops.facd_fast.feature_distances(student, teacher, None, "l1", "channel")
    ref_pos, ref_neg = reference.feature_distances(student.double(), teacher.double(), None, "l1", "channel")
    assert_close_relative(d_pos, ref_pos)
    assert_close_relative(d_neg, ref_neg)
    grad_pos, grad_neg = torch.randn(3), torch.randn(3)
    fused = torch.ops.facd_fast.feature_distances_backward(grad_pos, grad_neg, student, teacher, None, saved, "l1",
                                                           "channel", [True, True, False])
    expected = distances_backward(grad_pos.double(), grad_neg.double(), student.double(), teacher.double(), None,
                                  "l1", "channel")
    for got, want in zip(fused[:2], expected[:2]):
        assert_close_relative(got, want)
    assert fused[2].numel() == 0


def test_gradients_not_asked_for_are_empty():
    student, teacher, negatives = features((3, 4, 5, 5)), features((3, 4, 5, 5), seed=1), features((3, 2, 4, 5, 5))
    g_student, g_teacher, g_negatives = torch.ops.facd_fast.feature_distances_backward(
        torch.randn(3), torch.randn(3), student, teacher, negatives, NOTHING_SAVED, "l1", "channel",
        [False, True, False]
    )
    assert g_student.numel() == 0 and g_negatives.numel() == 0
    assert g_teacher.shape == teacher.shape and g_teacher.stride() == teacher.stride()


def test_kernel_errors_name_the_argument():
    student = features((2, 3, 4, 4))
    distances = torch.ops.facd_fast.feature_distances
    with pytest.raises(RuntimeError, match="in-batch negatives need B >= 2"):
        distances(student[:1], student[:1], None, "l1", "channel")
    with pytest.raises(RuntimeError, match="distance must be 'l1' or 'l2'"):
        distances(student, student, None, "l3", "channel")
    with pytest.raises(RuntimeError, match="normalize must be 'channel' or 'none'"):
        distances(student, student, None, "l1", "batch")
    with pytest.raises(TypeError, match="teacher must have the student's dtype"):
        distances(student, student.double(), None, "l1", "none")
    with pytest.raises(RuntimeError, match="negatives must have shape"):
        distances(student, student, features((2, 1, 3, 4, 5)), "l1", "none")
    with pytest.raises(RuntimeError, match="grad_pos must have shape"):
        torch.ops.facd_fast.feature_distances_backward(torch.ones(3), torch.ones(2), student, student, None,
                                                       NOTHING_SAVED, "l1", "none", [True, False, False])
    with pytest.raises(RuntimeError, match="output_mask asks for the negatives' gradient"):
        torch.ops.facd_fast.feature_distances_backward(torch.ones(2), torch.ones(2), student, student, None,
                                                       NOTHING_SAVED, "l1", "none", [True, False, True])
    with pytest.raises(RuntimeError, match="sr_teacher must have hr's shape"):
        torch.ops.facd_fast.patch_mse(student, student[:, :2], student)


def test_without_the_extension_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """Neither an installed facd_fast._C nor a working compiler: no ops; auto warns once and runs the reference."""
    real_import = ops.importlib.import_module

    def import_without_extension(name, *args):
        if name == "facd_fast._C":
            raise ImportError("not built")
        return real_import(name, *args)

    def failing_build(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(ops.importlib, "import_module", import_without_extension)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    monkeypatch.setattr(ops, "_ops_loaded", lambda: False)
    with pytest.raises(ops.KernelsUnavailable, match="c\\+\\+: command not found"):
        ops.load_library()

    # what ops._register records when load_library fails
    reason = "the facd_fast ops are unavailable: cannot build the C++ kernels: c++: command not found"
    monkeypatch.setattr(ops, "UNAVAILABLE", {ops.CPP: reason, ops.TRITON: reason})
    monkeypatch.setattr(api, "_warned_fallback", set())
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    student, teacher = features((3, 4, 5, 5)), features((3, 4, 5, 5), seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [facd_fast.contrastive_loss(student, teacher) for _ in range(3)]
    fallback_warnings = [w for w in caught if "falling back" in str(w.message)]
    assert len(fallback_warnings) == 1 and issubclass(fallback_warnings[0].category, RuntimeWarning)
    assert "command not found" in str(fallback_warnings[0].message)
    assert api.resolve_backend("auto", "cpu") == "reference"
    assert facd_fast.available_backends() == ["reference"]
    with pytest.raises(ops.KernelsUnavailable, match="command not found"):
        facd_fast.contrastive_loss(student, teacher, backend="cpp")
    expected = reference.contrastive_loss(student, teacher)
    for loss in losses:
        torch.testing.assert_close(loss, expected)


def expected_sign_sums(student, teacher, normalize):
    """The C++ kernels' saved sign sums (csrc/facd_cpu.h, SignState) from float64 torch: (2, B, C*H*W) exact
    integers, each row tile by tile (tiles of min(H*W, max(16, 1024 // C)) positions, each a (C, positions) block)."""
    s = reference.normalize_features(student.double(), normalize)
    t = reference.normalize_features(teacher.double(), normalize)
    batch, channels, height, width = s.shape
    positive = torch.sign(s - t)
    negative = sum(torch.sign(s - t[k]) for k in range(batch)) - positive
    per_tile = min(height * width, max(16, 1024 // channels))

    def tile_major(x):
        flat = x.reshape(batch, channels, height * width)
        tiles = [flat[:, :, p:p + per_tile].reshape(batch, -1) for p in range(0, height * width, per_tile)]
        return torch.cat(tiles, dim=1)

    return torch.stack((tile_major(positive), tile_major(negative))).to(torch.int64)


@pytest.mark.parametrize("capability", ["default", "auto"])
@pytest.mark.parametrize("normalize", ["channel", "none"])
@pytest.mark.parametrize("batch", [2, 3, 17, 128, 129])
def test_saved_sign_sums_are_exact(batch, normalize, capability):
    """l1's in-batch forward keeps sign(s_i - t_i) and sum_{k != i} sign(s_i - t_k) per element: exact integers,
    int8 up to B = 128 and int16 beyond; a partial last tile (H*W = 21, 16 positions per tile) included."""
    shape = (batch, 100, 3, 7) if batch <= 17 else (batch, 64, 1, 17)
    student, teacher = features(shape, dtype=torch.float64), features(shape, "channels_last", torch.float64, seed=1)
    student[0, :, 0, 0] = teacher[0, :, 0, 0]  # exact ties: sign 0
    ops.set_cpu_capability(capability)
    try:
        _, _, saved = torch.ops.facd_fast.feature_distances(student, teacher, None, "l1", normalize, True)
    finally:
        ops.set_cpu_capability("auto")
    assert saved.dtype == (torch.int8 if batch <= 128 else torch.int16) and saved.shape == (2, *shape)
    # torch normalises both in one layout, so that the tie stays an exact tie
    expected = expected_sign_sums(student, teacher.contiguous(), normalize)
    assert torch.equal(saved.reshape(2, batch, -1).to(torch.int64), expected)


def test_saved_sign_sums_only_when_asked_and_useful():
    """Kept for l1 with in-batch negatives and keep_state only: l2 in-batch is in closed form, explicit negatives
    sweep their pairs again, and a forward whose student needs no gradient keeps nothing."""
    student, teacher, negatives = features((3, 4, 5, 5)), features((3, 4, 5, 5), seed=1), features((3, 2, 4, 5, 5))
    distances = torch.ops.facd_fast.feature_distances
    assert distances(student, teacher, None, "l1", "channel", True)[2].shape == (2, 3, 4, 5, 5)
    for args in ((None, "l1", "channel", False), (None, "l2", "channel", True), (negatives, "l1", "none", True)):
        assert distances(student, teacher, *args)[2].numel() == 0
    with pytest.raises(RuntimeError, match="saved must be a contiguous tensor of shape"):
        torch.ops.facd_fast.feature_distances_backward(torch.ones(3), torch.ones(3), student, teacher, None,
                                                       torch.zeros(2, 3, 4, 5, dtype=torch.int8), "l1", "channel",
                                                       [True, False, False])


def test_the_next_step_reuses_the_sign_state_memory():
    """Once a step's state is released, the next state of that size takes its memory (no fresh pages)."""
    student, teacher = features((4, 8, 5, 6)), features((4, 8, 5, 6), seed=1)
    pointers = []
    for _ in range(2):
        *_, saved = torch.ops.facd_fast.feature_distances(student, teacher, None, "l1", "channel", True)
        pointers.append(saved.data_ptr())
        del saved
    assert pointers[0] == pointers[1]
    *_, larger = torch.ops.facd_fast.feature_distances(features((5, 8, 5, 6)), features((5, 8, 5, 6)), None, "l1",
                                                       "channel", True)
    assert larger.shape == (2, 5, 8, 5, 6)
