"""Compile every Triton kernel launch of facd_fast for a GPU, on a machine without one.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that
they compile: it accepts code the GPU compiler rejects. This script runs the
host launchers on CPU tensors with each kernel replaced by a recorder, then
compiles every distinct launch (argument types and constexprs) ahead of time
for the target with Triton's bundled ptxas, and prints registers and spills per
kernel. No kernel runs, so no GPU is needed and no timing is claimed.

    TRITON_INTERPRET=0 python bench/triton_compile_check.py [--arch 90] [--shape B C H W K]
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels this script compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from facd_fast.kernels import contrastive, patch_mse  # noqa: E402

#: Launch keywords that are compile options, not kernel arguments.
_COMPILE_OPTIONS = ("enable_fp_fusion", "num_warps", "num_stages")
_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                  torch.int8: "*i8", torch.int16: "*i16"}


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **constexprs)`` records instead of launching."""

    def __init__(self, kernel, launches):
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        def record(*args, **keywords):
            options = {name: keywords.pop(name) for name in _COMPILE_OPTIONS if name in keywords}
            constexprs, options = tuple(sorted(keywords.items())), tuple(sorted(options.items()))
            self.launches.add((self.kernel, _signature(self.kernel, args), constexprs, options))

        return record


def _resource_usage(cubin: bytes) -> str:
    """Registers and spill bytes of a cubin, as the bundled cuobjdump reports them."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if usage is None:
        return "resource usage unavailable"
    registers, stack, shared, local = usage.groups()
    return f"{registers} registers, {local} B local (spills), {shared} B shared"


def _signature(kernel, args):
    """Argument types as the launcher derives them: an annotated argument (``eps_norm: tl.float64``) has its type."""
    params = [param for param in kernel.params if not param.is_constexpr]
    types = []
    for param, value in zip(params, args):
        name = param.name
        if param.annotation_type:
            types.append((name, param.annotation_type))
        elif isinstance(value, torch.Tensor):
            types.append((name, _POINTER_TYPES[value.dtype]))
        elif isinstance(value, bool):
            types.append((name, "i1"))
        elif isinstance(value, int):
            types.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
        else:
            types.append((name, "fp32"))
    return tuple(types)


def _install_recorders(launches):
    for module in (contrastive, patch_mse):
        module.wrap_triton = lambda kernel: kernel  # the launchers wrap for torch.compile; a recorder needs no wrapping
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, LaunchRecorder(value, launches))


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _run_launchers(shape, dtypes):
    batch, channels, height, width, n_negatives = shape
    for dtype in dtypes:
        student = torch.randn(batch, channels, height, width, dtype=dtype)
        teacher = torch.randn(batch, channels, height, width, dtype=dtype)
        negatives = torch.randn(batch, n_negatives, channels, height, width, dtype=dtype)
        grad = torch.ones(batch, dtype=contrastive.compute_dtype(dtype))
        cases = itertools.product((None, negatives), ("l1", "l2"), ("channel", "none"), (False, True))
        for explicit, distance, normalize, keep_state in cases:
            *_, saved = contrastive.feature_distances_forward(student, teacher, explicit, distance, normalize,
                                                              keep_state)
            contrastive.feature_distances_backward(
                grad, grad, student, teacher, explicit, saved, distance, normalize, [True, True, explicit is not None]
            )
            if explicit is None:  # the student's gradient alone (from the saved sign sums for l1)
                contrastive.feature_distances_backward(
                    grad, grad, student, teacher, None, saved, distance, normalize, [True, False, False]
                )
        patch_mse.patch_mse(student[:, :3], teacher[:, :3], student[:, :3])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability: 80, 90 (default, H100)...")
    parser.add_argument("--shape", type=int, nargs=5, default=(16, 256, 48, 48, 8), metavar=("B", "C", "H", "W", "K"),
                        help="feature shape whose launches to compile (block sizes depend on it); default: EDSR tap")
    parser.add_argument("--dtypes", nargs="+", choices=list(_DTYPES), default=list(_DTYPES), help="input dtypes")
    args = parser.parse_args()
    launches = set()
    _install_recorders(launches)
    _run_launchers(tuple(args.shape), [_DTYPES[name] for name in args.dtypes])
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    ordered = sorted(launches, key=lambda launch: (launch[0].__name__, str(launch[1:])))
    for kernel, signature, constexprs, options in ordered:
        constants = dict(constexprs)
        full_signature = dict(signature) | {name: "constexpr" for name in constants}
        flags = ", ".join(f"{name}={getattr(value, 'name', value)}" for name, value in constexprs + options)
        label = f"{kernel.__name__}[{flags}]"
        try:
            source = ASTSource(kernel, full_signature, constants)
            compiled = triton.compile(source, target=target, options=dict(options))
        except Exception as error:  # report every failing launch, then fail
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        print(f"ok   {label}: {_resource_usage(compiled.asm['cubin'])}")
    print(f"{len(launches)} launches compiled for sm_{args.arch}, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
