"""What only the Triton kernels have: their tiling, their memory, the interpreter, the absence of triton.

Their results against the reference are in test_ops.py (the contract suite).
Without a GPU they run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1); select them alone with ``pytest -m triton``.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import facd_fast  # noqa: E402
from facd_fast import api, ops, reference  # noqa: E402
from facd_fast.kernels import contrastive as contrastive_kernels  # noqa: E402
from facd_fast.kernels import patch_mse as patch_mse_kernels  # noqa: E402
from facd_fast.kernels import tiling as kernel_tiling  # noqa: E402
from facd_fast.kernels import utils as kernel_utils  # noqa: E402
from test_ops import SHAPES, Kernel, check_against_reference, distances_and_gradients, make_inputs  # noqa: E402
from test_ops import poisoned  # noqa: E402,F401  (a fixture)

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(ops.TRITON in ops.UNAVAILABLE, reason="the Triton kernels are not available")]

DEVICES = (["cpu"] if ops.INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])
ADDRESSING = [("in-batch", "l1", "channel"), ("in-batch", "l2", "none"), ("explicit", "l2", "channel"),
              ("explicit", "l1", "none")]


def kernel_on(device):
    return Kernel(ops.TRITON, device)


@pytest.mark.parametrize("option", ADDRESSING, ids=["-".join(o) for o in ADDRESSING])
@pytest.mark.parametrize("device", DEVICES)
def test_multi_block_tiling(device, option, monkeypatch, poisoned):
    """Small blocks force every loop and tail: anchor, other-row, position and channel blocks, uneven channel runs."""
    monkeypatch.setattr(kernel_tiling, "_MAX_ROW_BLOCK", 2)
    monkeypatch.setattr(kernel_tiling, "_MAX_POSITION_BLOCK", 8)
    monkeypatch.setattr(kernel_tiling, "_MAX_CHANNEL_BLOCK", 2)
    monkeypatch.setattr(kernel_tiling, "_CHANNEL_TILE_ELEMENTS", 16)
    monkeypatch.setattr(kernel_utils, "_INTERPRETER_PROGRAMS", 12)  # 2 channel runs of 2 and 1 on CPU
    negatives, distance, normalize = option
    # bfloat16 without normalisation: the gradient adds up over other-row blocks in a float32 buffer, then is cast
    dtype = torch.bfloat16 if normalize == "none" else torch.float32
    inputs = make_inputs((3, 3, 3, 4, 3), negatives, dtype, device)
    check_against_reference(kernel_on(device), *inputs, distance, normalize)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_mse_multi_span(device, monkeypatch):
    """Uneven spans still sum every element once."""
    monkeypatch.setattr(kernel_utils, "_INTERPRETER_PROGRAMS", 5)
    monkeypatch.setattr(kernel_utils, "_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(patch_mse_kernels, "_ELEMENT_BLOCK", 16)
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(2, 3, 6, 7, generator=generator).to(device) for _ in range(3)]
    torch.testing.assert_close(facd_fast.patch_mse(*images, backend="triton"),
                               facd_fast.patch_mse(*images, backend="reference"))


@pytest.mark.parametrize("negatives, requires", [
    ("in-batch", ("student",)), ("in-batch", ("teacher",)), ("explicit", ("student",)), ("explicit", ("teacher",)),
    ("explicit", ("negatives",)), ("explicit", ("student", "negatives")),
])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_sweeps_only_inputs_that_need_gradients(device, negatives, requires, monkeypatch):
    """One gradient pass per input that requires grad (a frozen teacher costs nothing): a sweep over the pairs,
    or for l1's in-batch student the pass over the forward's saved sign sums."""
    swept = []

    def recording(launcher, input_index):
        def recorded(*args):
            swept.append(tuple(args[input_index].shape))
            return launcher(*args)

        return recorded

    monkeypatch.setattr(contrastive_kernels, "_anchor_gradient", recording(contrastive_kernels._anchor_gradient, 0))
    monkeypatch.setattr(contrastive_kernels, "_l1_student_gradient",
                        recording(contrastive_kernels._l1_student_gradient, 2))
    student, teacher, explicit, grad_pos, grad_neg = make_inputs((3, 4, 3, 5, 2), negatives, torch.float32, device)
    named = {"student": student, "teacher": teacher, "negatives": explicit}
    inputs = [named[name].requires_grad_() for name in requires]
    d_pos, d_neg = api.feature_distances(student, teacher, explicit, "l1", "channel", "triton")
    torch.autograd.grad((grad_pos * d_pos + grad_neg * d_neg).sum(), inputs)
    assert len(swept) == len(requires)


@pytest.mark.parametrize("negatives", ["in-batch", "explicit"])
@pytest.mark.parametrize("device", DEVICES)
def test_memory_stays_linear_in_the_inputs(device, negatives, monkeypatch):
    """No buffer larger than an input: nothing of size (B, B, C, H, W), nor (B, K, C, H, W) beyond the negatives.

    In bytes: in-batch l1 keeps its sign sums, (2, B, C, H, W) int8, half a float32 input."""
    allocated = []

    def recording(allocate):
        def allocate_recorded(*args, **kwargs):
            x = allocate(*args, **kwargs)
            allocated.append(x.numel() * x.element_size())
            return x

        return allocate_recorded

    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "empty_like", recording(torch.empty_like))
    family = "triton-interpreter" if device == "cpu" else "triton"
    # the second shape: on CUDA, B = 16, so a (B, B, C, H, W) buffer would be 8 times the peak allowed below
    student, teacher, explicit, grad_pos, grad_neg = make_inputs(SHAPES[family][1], negatives, torch.float32, device)
    largest_input = max(x.numel() * x.element_size() for x in (student, teacher, explicit) if x is not None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    distances_and_gradients("triton", student, teacher, explicit, grad_pos, grad_neg, "l1", "channel")
    assert allocated and max(allocated) <= largest_input
    if device == "cuda":
        # gradients, one float32 grad_hat at a time, the inputs' detached copies: a few inputs' worth, never B times one
        input_bytes = sum(x.numel() * x.element_size() for x in (student, teacher, explicit) if x is not None)
        assert torch.cuda.max_memory_allocated() - baseline <= 4 * input_bytes


def test_which_device_types_the_triton_kernels_serve(monkeypatch):
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    assert "triton" in facd_fast.available_backends()
    assert "cuda" in ops.device_types("triton")
    if ops.INTERPRETED:
        # the interpreter runs at Python speed: auto never picks it for CPU tensors; asked for, it serves them
        assert "cpu" in ops.device_types("triton")
        assert api.resolve_backend("auto", "cpu") != "triton"
        assert api.resolve_backend("triton", "cpu") == "triton"
    else:
        with pytest.raises(ValueError, match="backend='triton' runs on cuda tensors"):
            api.resolve_backend("triton", "cpu")
    if torch.cuda.is_available() and not ops.INTERPRETED:
        assert api.resolve_backend("auto", "cuda") == "triton"


@pytest.mark.skipif(not ops.INTERPRETED or ops.CPP in ops.UNAVAILABLE, reason="needs the interpreter and the C++ ops")
def test_interpreter_takes_and_gives_back_the_cpu_key(monkeypatch):
    """backend="triton" on CPU tensors puts the launchers in place of the C++ kernels; "cpp" and "auto" put them back."""
    launched = []
    forward = contrastive_kernels.feature_distances_forward

    def recording_forward(*args):
        launched.append("triton")
        return forward(*args)

    ops.use_kernels("cpp", "cpu")  # an earlier test may have left the launchers registered
    monkeypatch.setattr(contrastive_kernels, "feature_distances_forward", recording_forward)
    monkeypatch.delenv(api.ENV_VAR, raising=False)
    student, teacher, _, _, _ = make_inputs((3, 2, 2, 3, 1), "in-batch", torch.float32, "cpu")
    try:
        triton_loss = facd_fast.contrastive_loss(student, teacher, backend="triton")
        assert launched == ["triton"]
        cpp_loss = facd_fast.contrastive_loss(student, teacher, backend="cpp")
        auto_loss = facd_fast.contrastive_loss(student, teacher)
        assert launched == ["triton"]
        torch.testing.assert_close(triton_loss, cpp_loss)
        torch.testing.assert_close(auto_loss, cpp_loss)
    finally:
        ops.use_kernels("cpp", "cpu")


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    for name in [m for m in sys.modules if m.startswith("facd_fast.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match="triton"):
        ops._triton_launchers()
    # what ops._register records then
    monkeypatch.setitem(ops.UNAVAILABLE, ops.TRITON, "triton cannot be imported (No module named 'triton')")
    device = DEVICES[0] if DEVICES else "cuda"
    with pytest.raises(ops.KernelsUnavailable, match="triton cannot be imported"):
        api.resolve_backend("triton", device)
    assert "triton" not in facd_fast.available_backends()


@pytest.mark.parametrize("batch", [2, 3, 17, 128])
@pytest.mark.parametrize("device", DEVICES)
def test_saved_sign_sums_are_exact(device, batch):
    """l1's in-batch forward keeps sign(s_i - t_i) and sum_{k != i} sign(s_i - t_k), (2, B, C, H, W) int8:
    exact integers, summed in place over several blocks of teacher rows once B > 16."""
    generator = torch.Generator().manual_seed(batch)
    shape = (batch, 3, 2, 3) if device == "cpu" else (batch, 37, 13, 17)
    student = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    student[0, :, 0, 0] = teacher[0, :, 0, 0]  # exact ties: sign 0
    _, _, saved = contrastive_kernels.feature_distances_forward(student, teacher, None, "l1", "channel", True)
    s, t = (reference.normalize_features(x, "channel") for x in (student, teacher))
    positive = torch.sign(s - t)
    negative = sum(torch.sign(s - t[k]) for k in range(batch)) - positive
    assert saved.dtype == torch.int8 and saved.shape == (2, *shape)
    assert torch.equal(saved.long(), torch.stack((positive, negative)).long())


#: What each Triton kernel writes (its output buffers); every other tensor argument is only read.
WRITTEN = {
    "_channel_inverse_norms_kernel": {"inv_norm_ptr"},
    "_pair_distance_sums_kernel": {"pair_sums_ptr", "positive_sums_ptr", "sign_state_ptr"},
    "_pair_gradient_kernel": {"grad_ptr"},
    "_channel_normalize_backward_kernel": {"grad_ptr"},
    "_l1_student_gradient_kernel": {"grad_ptr"},
    "_l2_in_batch_sums_kernel": {"partial_ptr"},
    "_l2_in_batch_gradient_kernel": {"student_grad_ptr", "teacher_grad_ptr"},
    "_patch_squared_error_sums_kernel": {"sums_ptr"},
}

#: Traces every launcher as torch.compile's AOTAutograd does (functionalised, fake tensors) and prints, per
#: wrap_triton launch in the graph, the kernel and the arguments it clones as mutated. Without a GPU, the TTIR
#: that torch's mutation analysis reads is generated for sm_90 (a stand-in driver names the target); the
#: kernels must be compiled ones, not the interpreter's, so the process runs with TRITON_INTERPRET=0.
TRACE_SCRIPT = textwrap.dedent(
    """
    import itertools, json
    import torch
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Sm90())
    from facd_fast.kernels import contrastive, patch_mse

    launches = []

    def trace(function, *args):
        graph = make_fx(functionalize(function), tracing_mode="fake")(*args)
        for node in graph.graph.nodes:
            if node.target is triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                launches.append((kernel.fn.__name__, sorted(node.kwargs["tensors_to_clone"])))

    student, teacher = torch.randn(3, 5, 3, 4), torch.randn(3, 5, 3, 4)
    grad = torch.ones(3)
    for negatives, distance, normalize, keep_state in itertools.product(
            (None, torch.randn(3, 2, 5, 3, 4)), ("l1", "l2"), ("channel", "none"), (False, True)):
        def forward_backward(g, s, t, n):
            *_, saved = contrastive.feature_distances_forward(s, t, n, distance, normalize, keep_state)
            mask = [True, True, n is not None]
            return contrastive.feature_distances_backward(g, g, s, t, n, saved, distance, normalize, mask)

        trace(forward_backward, grad, student, teacher, negatives)
    trace(patch_mse.patch_mse, student[:, :3], teacher[:, :3], student[:, :3])
    print(json.dumps(launches))
    """
)


@pytest.mark.slow
def test_compile_clones_only_what_the_kernels_write():
    """Under torch.compile, a kernel argument its mutation analysis finds written is cloned on every call:
    read-only inputs (the features, the teacher, the negatives, their inverse norms) must never be."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, timeout=600,
                            env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "assuming every input is mutated" not in result.stderr, result.stderr[-4000:]
    launches = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name for name, _ in launches} == set(WRITTEN)
    for name, cloned in launches:
        assert set(cloned) <= WRITTEN[name], f"{name} clones read-only inputs: {sorted(set(cloned) - WRITTEN[name])}"


def test_norm_floor_is_a_float64_argument():
    """eps_norm reaches the compiled kernels as float64: a plain float argument is typed fp32 at launch. The
    interpreter ignores the annotation (the closed-form tests check the value), so this reads it as a compiled
    launch does (triton's KernelParam), from the kernels' Python functions."""
    from triton.runtime.jit import KernelParam

    types = {}
    for module in (contrastive_kernels, patch_mse_kernels):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel"):
                for index, param in enumerate(inspect.signature(kernel.fn).parameters.values()):
                    if param.name == "eps_norm":
                        types[name] = KernelParam(index, param, False, False).annotation_type
    assert set(types) == {"_channel_inverse_norms_kernel", "_channel_normalize_backward_kernel",
                          "_l1_student_gradient_kernel"}
    assert set(types.values()) == {"fp64"}, types
