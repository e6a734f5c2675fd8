"""The GPU check of facd_fast in two device calls that each fit 8 minutes and lose nothing finished.

    bash bench/gpu_check.sh tests          # call 1: set-up, then the Triton tests on CUDA
    bash bench/gpu_check.sh bench          # call 2: set-up (kept if call 1 left it), kernel benchmark, training step
    bash bench/gpu_check.sh tests --dry    # the same steps on CPU tensors: tiny shapes, Triton's interpreter
    bash bench/gpu_check.sh bench --dry    # (tests/test_gpu_check.py runs both)
    bash bench/gpu_check.sh tests -- -k zero_vectors   # a rerun of some tests: pytest's arguments after --

bench/gpu_check.sh runs this file with python3 and PYTHONUNBUFFERED=1; with the
device tool, one call per part, e.g. ``run("bash bench/gpu_check.sh tests",
timeout_s=480)``. Each part:

1. checks what the build needs before building anything and names what is
   missing: Python.h, setuptools >= 77 (pyproject's ``license = "MIT"``), a
   C++ compiler, pip, torch, triton, and for the tests pytest-timeout;
2. installs the checkout with one ``pip install --no-build-isolation
   --no-deps -e .``, which builds facd_fast._C once; nothing imports
   facd_fast before it, so no JIT build runs first. A checkout already
   installed editable here, its extension built for this Python, is kept;
3. checks in a fresh process that facd_fast._C loads against this torch and
   that the Triton kernels serve the device's tensors: CUDA and compiled on
   the device (TRITON_INTERPRET is removed from the environment there),
   CPU and interpreted in the dry run;
4. tests: the Triton cases of tests/test_ops.py and tests/test_triton_kernels.py
   (:data:`TESTS`) with ``pytest -x --timeout``; the part fails when any
   selected case fails, errs or is skipped, or when none ran.
   bench: the focused kernel benchmark (:func:`kernel_cases`: the EDSR and
   RCAN taps, fp32 and bf16, l1 and l2, forward+backward; fused and eager
   first, then the training step, then torch.compile, the slow one), and
   the paper-setting training step, fused against reference
   (:func:`paper_training_step`). An entry that would not finish inside the
   part's time is skipped, and its row says so;
5. prints a short table last, and writes it beside the rest; a part that
   stops early (a missing prerequisite, a failed build) still writes it,
   saying which step stopped it. Exit status 0 only when every step passed.

Output, into $OUT (or --out), written as the part goes so that a timeout loses
nothing finished; at most 8 files per call (the device tool brings back 8):
  tests: tests.log (every line the part prints, pytest's included), tests-junit.xml, tests-summary.txt
  bench: bench.log, kernels-cuda.csv (kernels.csv in the dry run; a row per entry as it finishes),
         train_step.csv (a row per case and backend as it finishes), bench-summary.txt

What fits 8 minutes, as counted on CPU for the CUDA shapes (a recorder in
place of each kernel, the launches of the selected tests at the CUDA shapes
and grid sizes): the tests select 133 cases whose launches have about 330
distinct compile signatures, at about 0.44 s each cold (2.5 minutes), plus
the Inductor compiles of test_compile_fullgraph and opcheck; the old
gpu_check.sh ran about 236 tests with up to 854 signatures. Left out: the
fuzz suite (each drawn shape is a new compile) and the two tests below. The benchmark is
24 entries with 8 Inductor compiles (the old default: 224 entries, 56
compiles), then 4 training-step runs. ``--budget`` (default 450 s) is the
part's own limit, inside the call's 8 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "bench")
#: What each part writes into the output folder, by part (the kernel CSV's name depends on the device).
OUTPUTS = {
    "tests": ("tests.log", "tests-junit.xml", "tests-summary.txt"),
    "bench": ("bench.log", "{kernels_csv}", "{train_stem}.csv", "{train_stem}.png", "bench-summary.txt"),
}
#: The device tool brings back at most this many files per call.
MAX_FILES = 8
SETUPTOOLS_MIN = 77
#: The device's tests: every Triton case of the contract suite and of the Triton kernels' own tests.
TESTS = ["-m", "triton", "tests/test_ops.py", "tests/test_triton_kernels.py",
         # needs the interpreter, so it is skipped on a GPU (and a skip fails the part)
         "--deselect", "tests/test_triton_kernels.py::test_interpreter_takes_and_gives_back_the_cpu_key",
         # torch's mutation analysis on the host (no GPU needed): make test runs it
         "--deselect", "tests/test_triton_kernels.py::test_compile_clones_only_what_the_kernels_write"]
#: The dry run's tests: the same machinery on a few interpreted cases (the device's selection takes minutes there).
DRY_TESTS = ["-m", "triton", "tests/test_ops.py", "tests/test_triton_kernels.py",
             "-k", "(test_every_option_and_shape and B2-C2-H1-W1) or test_norm_floor_is_a_float64_argument"]
#: Per-test limit of pytest-timeout (a compile-heavy case takes a minute or two cold).
TEST_TIMEOUT_S = 240
#: The focused kernel benchmark: the paper's taps (kernels.SHAPES), both dtypes and distances, forward+backward,
#: each with every provider. The dry run's stand-ins keep the EDSR tap the wider one.
TAPS = ("edsr", "rcan")
DRY_TAP_SHAPES = {"edsr": (3, 16, 4, 5), "rcan": (3, 8, 4, 5)}
KERNEL_DTYPES = ("float32", "bfloat16")
KERNEL_DISTANCES = ("l1", "l2")
KERNEL_PROVIDERS = ("fused", "eager", "compile")
KERNEL_ENTRIES = len(TAPS) * len(KERNEL_DTYPES) * len(KERNEL_DISTANCES) * len(KERNEL_PROVIDERS)
#: Seconds kept at the end of a part for the summary.
RESERVE_S = 20
#: Seconds an entry of each provider may take on the device, compile and warm-up included: one is not
#: started with less time left (Inductor compiles the reference's forward and backward for each case).
ENTRY_ESTIMATE_S = {"fused": 20.0, "eager": 15.0, "compile": 75.0}
#: The same in the dry run (tiny CPU tensors; torch.compile with Dynamo's eager backend).
DRY_ENTRY_ESTIMATE_S = {"fused": 2.0, "eager": 2.0, "compile": 5.0}
#: The training step is not started with less time left than this.
TRAIN_STEP_ESTIMATE_S = {"device": 150.0, "dry": 20.0}


# --- output -------------------------------------------------------------------------------------


class Log:
    """Lines to stdout and to the part's log file, each flushed as written (a killed run keeps them)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with open(self.path, "a") as log:
            log.write(line + "\n")


def run_streamed(command: Sequence[str], log: Log, timeout_s: float, env: Optional[Dict[str, str]] = None) -> int:
    """Runs ``command`` in the checkout, every output line into ``log`` as it comes; the exit status, or 124 when
    it ran past ``timeout_s`` (then it is killed: what it wrote stays)."""
    log(f"$ {' '.join(command)}")
    deadline = time.monotonic() + max(timeout_s, 1.0)
    # its own process group: at the deadline the command goes with every process it started (pytest's subprocesses)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, start_new_session=True)
    timed_out = False

    def kill_at_deadline() -> None:
        nonlocal timed_out
        while process.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_at_deadline, daemon=True)
    watcher.start()
    for line in process.stdout:
        log(line.rstrip("\n"))
    process.wait()
    watcher.join()
    if timed_out:
        log(f"[gpu_check] stopped after {timeout_s:.0f} s: out of this call's time")
        return 124
    return process.returncode


# --- steps 1 to 3: prerequisites, install, kernels --------------------------------------------


def missing_prerequisites(part: str) -> Tuple[List[str], List[str]]:
    """(what is missing, what was found): everything the build and the part need, checked before any build."""
    missing, found = [], []
    include = sysconfig.get_paths()["include"]
    # the compiler also searches CPATH: headers carried to a machine without a package manager can go there
    folders = [include] + [f for f in os.environ.get("CPATH", "").split(os.pathsep) if f]
    header = next((os.path.join(f, "Python.h") for f in folders if os.path.exists(os.path.join(f, "Python.h"))), None)
    if header:
        found.append(f"Python.h ({os.path.dirname(header)})")
    else:
        missing.append(f"Python.h, the headers of Python {sysconfig.get_python_version()} (not in {include} nor "
                       f"CPATH): install them (Debian: python{sysconfig.get_python_version()}-dev) or, with no "
                       f"network, carry them and name their folder in CPATH")
    try:
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        setuptools_version = None
    major = int(setuptools_version.split(".")[0]) if setuptools_version else 0
    if major >= SETUPTOOLS_MIN:
        found.append(f"setuptools {setuptools_version}")
    else:
        missing.append(f"setuptools >= {SETUPTOOLS_MIN} (found {setuptools_version or 'none'}; pyproject's "
                       f"license = \"MIT\" needs it): carry a setuptools wheel and install it first")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler):
        found.append(f"C++ compiler {compiler}")
    else:
        missing.append(f"a C++ compiler ({compiler} is not on PATH)")
    has_ninja = shutil.which("ninja") or importlib.util.find_spec("ninja") is not None
    found.append("ninja" if has_ninja else "no ninja (the extension builds without it, slower)")
    modules = {"pip": "pip", "torch": "torch", "triton": "triton"}
    if part == "tests":
        modules.update(pytest="pytest", pytest_timeout="pytest-timeout")
    for module, package in modules.items():
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {package}")
        else:
            found.append(package)
    return missing, found


def installed_here() -> Optional[str]:
    """Why the checkout needs no install (editable here, extension built for this Python), or None if it does."""
    extension = ROOT / "facd_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    try:
        direct_url = json.loads(importlib.metadata.distribution("facd-fast").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return None
    editable = direct_url.get("dir_info", {}).get("editable", False)
    here = direct_url.get("url", "") in (ROOT.as_uri(), ROOT.as_uri() + "/")
    if editable and here and extension.exists():
        return f"installed editable from this checkout, {extension.name} built"
    return None


def install(log: Log, timeout_s: float) -> Tuple[bool, str]:
    """The one ``pip install --no-build-isolation --no-deps -e .`` (it builds facd_fast._C), unless already done:
    (whether the checkout is installed, what happened)."""
    kept = installed_here()
    if kept:
        result = True, f"kept: {kept}"
    else:
        started = time.monotonic()
        status = run_streamed([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                               "."], log, timeout_s)
        seconds = time.monotonic() - started
        result = status == 0, (f"built facd_fast._C and installed editable in {seconds:.0f} s" if status == 0
                               else f"FAILED after {seconds:.0f} s (pip exit status {status}; see the log)")
    log(f"[gpu_check] install: {result[1]}")
    return result


def step_environment(dry: bool) -> Dict[str, str]:
    """The steps' environment: Triton's interpreter in the dry run, never on the device."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if dry:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_kernels(dry: bool) -> str:
    """In a fresh process after the install: facd_fast._C loads, the Triton kernels serve the device; a smoke call.

    Raises AssertionError (or the import's error) naming what is wrong; returns what it found.
    """
    import torch

    extension = ROOT / "facd_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert extension.exists(), f"facd_fast._C is not built: {extension} is missing"
    # its schemas and CPU kernels load against this torch: checked before the package imports it, which
    # would otherwise fall back to a JIT build of the C++ sources (minutes) and hide the broken build
    torch.ops.load_library(str(extension))
    import facd_fast
    from facd_fast import api, ops

    importlib.import_module("facd_fast._C")
    assert not ops.UNAVAILABLE, f"kernel sets unavailable: {ops.UNAVAILABLE}"
    if dry:
        assert ops.INTERPRETED, "the dry run needs TRITON_INTERPRET=1"
        device = torch.device("cpu")
    else:
        assert torch.cuda.is_available(), "torch sees no CUDA device"
        assert not ops.INTERPRETED, "TRITON_INTERPRET=1 is set: the kernels would be emulated, not compiled"
        assert api.resolve_backend("auto", "cuda") == "triton", "backend auto does not pick Triton on CUDA"
        device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 8, 3, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    teacher = torch.randn(4, 8, 3, 5, generator=generator, dtype=torch.float64).to(device)
    got = facd_fast.contrastive_loss(student, teacher, backend="triton")
    (got_grad,) = torch.autograd.grad(got, student)
    want = facd_fast.contrastive_loss(student, teacher, backend="reference")
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    import triton

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, interpreted"
    return (f"facd_fast._C loaded ({ops.cpu_capability()}); Triton kernels on {where}; torch {torch.__version__}, "
            f"triton {triton.__version__}; smoke loss and gradient equal to the reference")


# --- step 4: tests ------------------------------------------------------------------------------


def test_command(out: Path, dry: bool, extra: Sequence[str], timeout_s: float) -> List[str]:
    per_test = min(TEST_TIMEOUT_S, max(int(timeout_s), 1))
    return [sys.executable, "-m", "pytest", "-x", f"--timeout={per_test}", "-q", "-rfEs", "--durations=10",
            "-p", "no:cacheprovider", f"--junitxml={out / 'tests-junit.xml'}", *(DRY_TESTS if dry else TESTS),
            *extra]


def junit_counts(path: Path) -> Optional[Dict[str, float]]:
    """tests, failures, errors, skipped and time of a pytest JUnit file (None if pytest never wrote one)."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {key: 0.0 for key in ("tests", "failures", "errors", "skipped", "time")}
    for suite in suites:
        for key in totals:
            totals[key] += float(suite.get(key, 0))
    return totals


def skipped_cases(path: Path) -> List[str]:
    root = ElementTree.parse(path).getroot()
    return [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
            if case.find("skipped") is not None]


def tests_verdict(out: Path, status: int) -> Tuple[bool, str]:
    """Whether the tests passed (no failure, error or skip, at least one case) and a one-line account."""
    counts = junit_counts(out / "tests-junit.xml")
    if counts is None:
        return False, f"no JUnit report (pytest exit status {status}: stopped before it finished)"
    line = (f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']:.0f} passed, "
            f"{counts['failures']:.0f} failed, {counts['errors']:.0f} errors, {counts['skipped']:.0f} skipped "
            f"of {counts['tests']:.0f} in {counts['time']:.0f} s (pytest exit status {status})")
    if counts["skipped"]:
        return False, line + "; skipped: " + ", ".join(skipped_cases(out / "tests-junit.xml"))
    return status == 0 and counts["tests"] > 0 and not counts["failures"] and not counts["errors"], line


# --- step 4: benchmark --------------------------------------------------------------------------


def kernel_cases(dry: bool):
    """The focused kernel benchmark's cases (:data:`TAPS`, :data:`KERNEL_DTYPES`, :data:`KERNEL_DISTANCES`),
    forward+backward, the training step's mode."""
    from facd_fast.bench import kernels

    shapes = {f"{tap}-dry": DRY_TAP_SHAPES[tap] for tap in TAPS} if dry else {tap: kernels.SHAPES[tap] for tap in TAPS}
    return [kernels.Case(name, shape, dtype, "forward+backward", distance)
            for name, shape in shapes.items() for distance in KERNEL_DISTANCES for dtype in KERNEL_DTYPES]


def run_kernel_entries(out: Path, providers: Sequence[str], dry: bool, deadline: float) -> None:
    """The benchmark's entries for ``providers`` over :func:`kernel_cases`, each row appended to the CSV as it
    finishes; an entry that would end past ``deadline`` (time.time()) is not started, and its row says so."""
    import torch

    from facd_fast.bench import kernels

    device = torch.device("cpu" if dry else "cuda")
    path = kernels.csv_path(out, device)
    estimates = DRY_ENTRY_ESTIMATE_S if dry else ENTRY_ESTIMATE_S
    reps = dict(min_reps=1, max_reps=1, budget_s=0.0) if dry else {}
    print(kernels.quiet_machine_note(device), flush=True)
    bandwidth = kernels.measure_bandwidth(device)
    for provider in providers:
        for case in kernel_cases(dry):
            left = deadline - time.time()
            started = time.perf_counter()
            if left < estimates[provider]:
                row = kernels.untimed_row(case, provider, device,
                                          f"skipped: out of this call's time ({left:.0f} s left)")
            else:
                try:
                    row = kernels.benchmark_entry(case, provider, device, bandwidth, **reps,
                                                  compile_backend="eager" if dry else "inductor")
                except Exception as error:  # one broken entry must not lose the others: its row says what broke
                    row = kernels.untimed_row(case, provider, device, f"failed: {type(error).__name__}: {error}")
            kernels.append_row(row, path)
            print(kernels.entry_line(case, row, time.perf_counter() - started), flush=True)


def paper_training_step(out: Path, dry: bool) -> None:
    """The paper-setting training step (x4, HR 192, batch 16, the EDSR pair of docs/models.md), phase by
    phase (:mod:`facd_fast.bench.train_step`): none, fd-l1 and facd, each with the default precisions (bf16
    teacher and student on CUDA), with both in fp32, and with the reference loss in place of the fused one.
    Its CSV and plot are rewritten after every round, so a timeout keeps the rounds done. The dry run
    takes the demo pair at a tiny patch on CPU instead."""
    from facd_fast.bench import train_step

    variants = {**train_step.VARIANTS, "reference-loss": ["distill.backend=reference"]}
    if dry:
        train_step.run(out_dir=out, setting="demo", methods=("none", "facd"), variants=variants, steps=1, rounds=1,
                       device="cpu", sets=["train.batch_size=2", "data.patch_size=16"])
    else:
        train_step.run(out_dir=out, setting="paper", variants=variants, steps=10, rounds=3, device="cuda")


# --- step 5: summary ----------------------------------------------------------------------------


def read_csv(path: Path) -> List[Dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def kernel_table(rows: List[Dict[str, str]]) -> List[str]:
    """fused, compile and eager p50 per case, the floor, and the fused kernel's ratios."""
    if not rows:
        return ["kernel benchmark: no row written"]
    by_case: Dict[Tuple[str, str, str], Dict[str, Dict[str, str]]] = {}
    for row in rows:
        by_case.setdefault((row["shape"], row["distance"], row["dtype"]), {})[row["provider"]] = row
    lines = [f"kernel benchmark, {rows[0]['mode']}, p50 ms on {rows[0]['device']}",
             f"{'shape':<15}{'dist':<5}{'dtype':<9}{'fused':>9}{'compile':>9}{'eager':>9}{'floor':>10}"
             f"{'compile/fused':>14}{'fused/floor':>12}"]
    for (shape, distance, dtype), by_provider in by_case.items():
        p50 = {p: _number(by_provider.get(p, {}).get("p50")) for p in ("fused", "compile", "eager")}
        floor = min((_number(r.get("floor")) for r in by_provider.values() if r.get("floor")), default=math.nan)
        lines.append(f"{shape:<15}{distance:<5}{dtype:<9}{p50['fused']:>9.3g}{p50['compile']:>9.3g}"
                     f"{p50['eager']:>9.3g}{floor:>10.3g}{p50['compile'] / p50['fused']:>13.1f}x"
                     f"{p50['fused'] / floor:>11.1f}x")
    notes = sorted({f"{r['provider']} {r['shape']} {r['distance']} {r['dtype']}: {r['note']}"
                    for r in rows if r.get("note")})
    return lines + [f"  {note}" for note in notes]


def train_table(rows: List[Dict[str, str]]) -> List[str]:
    """Mean step ms per method and variant, the teacher's share, and each variant's speedup over fp32."""
    if not rows:
        return ["training step: no row written"]
    steps: Dict[str, Dict[str, float]] = {}
    teacher: Dict[Tuple[str, str], float] = {}
    for row in rows:
        steps.setdefault(row["method"], {})[row["variant"]] = _number(row["step_ms_mean"])
        if row["phase"] == "teacher":
            teacher[(row["method"], row["variant"])] = _number(row["share"])
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lines = [f"training step ({rows[0]['setting']}, {rows[0]['device']}): mean ms per step (teacher share)",
             f"{'method':<10}" + "".join(f"{v:>22}" for v in variants) + f"{'fp32 / default':>16}"]
    for method, by_variant in steps.items():
        cells = "".join(f"{by_variant.get(v, math.nan):>12.1f} ({100 * teacher.get((method, v), 0.0):>5.1f}%)"
                        for v in variants)
        speedup = by_variant.get("fp32", math.nan) / by_variant.get("default", math.nan)
        lines.append(f"{method:<10}{cells}{speedup:>15.2f}x")
    return lines


# --- the parts ----------------------------------------------------------------------------------


def expected_outputs(part: str, dry: bool) -> List[str]:
    kernels_csv = "kernels.csv" if dry else "kernels-cuda.csv"
    return [name.format(kernels_csv=kernels_csv, train_stem=train_stem(dry)) for name in OUTPUTS[part]]


def train_stem(dry: bool) -> str:
    """The training-step benchmark's file names (facd_fast.bench.train_step suffixes CUDA results)."""
    return "train_step" if dry else "train_step-cuda"


def run_part(part: str, out: Path, dry: bool, budget_s: float, pytest_args: Sequence[str]) -> int:
    started = time.time()
    deadline = started + budget_s
    out.mkdir(parents=True, exist_ok=True)
    for name in expected_outputs(part, dry):
        (out / name).unlink(missing_ok=True)
    log = Log(out / f"{part}.log")

    def left() -> float:
        """Seconds this part may still spend before its summary."""
        return deadline - time.time() - RESERVE_S

    results: List[Tuple[str, str]] = []
    ok = True
    mode = "dry run on CPU" if dry else "device"
    log(f"[gpu_check] part {part}, {mode}; python {sys.version.split()[0]} at {sys.executable}; "
        f"budget {budget_s:.0f} s")
    if not dry and shutil.which("nvidia-smi"):
        run_streamed(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
                     log, 30)

    missing, found = missing_prerequisites(part)
    log(f"[gpu_check] prerequisites found: {', '.join(found)}")
    if missing:
        for item in missing:
            log(f"[gpu_check] MISSING: {item}")
        results.append(("prerequisites", "MISSING: " + "; ".join(missing)))
        return finish(part, out, dry, log, results, ok=False)
    results.append(("prerequisites", "ok: " + ", ".join(found)))

    installed, account = install(log, left())
    results.append(("install", account))
    if not installed:
        return finish(part, out, dry, log, results, ok=False)

    env = step_environment(dry)
    step = [sys.executable, str(Path(__file__).resolve()), "step"] + (["--dry"] if dry else [])
    status = run_streamed(step + ["check", "--out", str(out)], log, left(), env)
    if status != 0:
        results.append(("kernels", f"FAILED (exit status {status}; see the log)"))
        return finish(part, out, dry, log, results, ok=False)
    results.append(("kernels", "ok: facd_fast._C loads, the Triton kernels serve "
                    + ("CPU tensors in the interpreter" if dry else "CUDA tensors, compiled")))

    if part == "tests":
        status = run_streamed(test_command(out, dry, pytest_args, left()), log, left(), env)
        passed, line = tests_verdict(out, status)
        results.append(("tests", ("ok: " if passed else "FAILED: ") + line))
        ok = passed
    else:
        # the slow torch.compile entries last: out of time, they are what is lost
        for what, command in (("fused and eager", ["kernels", "fused", "eager"]), ("training step", ["train"]),
                              ("torch.compile", ["kernels", "compile"])):
            if what == "training step" and left() < TRAIN_STEP_ESTIMATE_S["dry" if dry else "device"]:
                log(f"[gpu_check] training step not started: {left():.0f} s left")
                results.append((what, "SKIPPED: out of this call's time"))
                ok = False
                continue
            status = run_streamed(step + [*command, "--out", str(out), "--deadline", str(deadline - RESERVE_S)],
                                  log, left(), env)
            results.append((what, "done" if status == 0 else f"FAILED (exit status {status}; see the log)"))
            ok = ok and status == 0
        kernel_rows = read_csv(out / expected_outputs("bench", dry)[1])
        untimed = [row for row in kernel_rows if row.get("note")]
        results.append(("kernel rows", f"{len(kernel_rows) - len(untimed)} timed, {len(untimed)} not, "
                                       f"of {KERNEL_ENTRIES}"))
        ok = ok and not untimed and len(kernel_rows) == KERNEL_ENTRIES
    return finish(part, out, dry, log, results, ok)


def finish(part: str, out: Path, dry: bool, log: Log, results: List[Tuple[str, str]], ok: bool) -> int:
    """Writes the summary and prints it last; checks that the part wrote what it should, within the file limit."""
    lines = [f"facd_fast GPU check, part {part}{' (dry run on CPU)' if dry else ''}"]
    lines += [f"{name:<16}{result}" for name, result in results]
    if part == "bench":
        lines += kernel_table(read_csv(out / expected_outputs("bench", dry)[1]))
        lines += train_table(read_csv(out / f"{train_stem(dry)}.csv"))
    lines.append(f"{'verdict':<16}{'PASS' if ok else 'FAIL'}")
    (out / f"{part}-summary.txt").write_text("\n".join(lines) + "\n")
    files = sorted(path.name for path in out.iterdir() if path.is_file())
    log(f"[gpu_check] {len(files)} files in {out}: {', '.join(files)}")
    if len(files) > MAX_FILES:
        log(f"[gpu_check] more than {MAX_FILES} files: the device tool would leave some behind")
        ok = False
    expected = sorted(expected_outputs(part, dry))
    if dry and ok and files != expected:
        log(f"[gpu_check] the dry run wrote {files}, expected {expected}")
        ok = False
    log("\n".join(lines))
    return 0 if ok else 1


# --- command line -------------------------------------------------------------------------------


def step_main(argv: Sequence[str]) -> int:
    """``gpu_check.py step [--dry] check|kernels PROVIDER...|train --out DIR [--deadline T]``: one step in its own
    process, after the install (the part runs these; they import facd_fast)."""
    parser = argparse.ArgumentParser(prog="gpu_check.py step")
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("name", choices=("check", "kernels", "train"))
    parser.add_argument("providers", nargs="*", help=f"with kernels: some of {', '.join(KERNEL_PROVIDERS)}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=math.inf, help="time.time() by which to be done")
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers if p not in KERNEL_PROVIDERS]
    if unknown or (args.name == "kernels") != bool(args.providers):
        parser.error(f"providers ({', '.join(KERNEL_PROVIDERS)}) go with kernels only, got {args.providers}")
    if args.name == "check":
        print(f"[gpu_check] kernels: {check_kernels(args.dry)}", flush=True)
    elif args.name == "kernels":
        run_kernel_entries(args.out, args.providers, args.dry, args.deadline)
    else:
        paper_training_step(args.out, args.dry)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["step"]:
        return step_main(argv[1:])
    pytest_args: List[str] = []
    if "--" in argv:
        argv, pytest_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=PARTS, help="tests (call 1) or bench (call 2)")
    parser.add_argument("--dry", action="store_true", help="the same steps on CPU tensors, no GPU needed")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, which the device tool brings back)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds this part may take, inside the call's limit (default 450)")
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error("name the output folder with --out, or set OUT")
    if args.budget <= RESERVE_S:
        parser.error(f"--budget must be more than {RESERVE_S} seconds, got {args.budget:g}")
    if pytest_args and args.part != "tests":
        parser.error("arguments after -- go to pytest: only the tests part takes them")
    with contextlib.suppress(KeyboardInterrupt):
        return run_part(args.part, out, args.dry, args.budget, pytest_args)
    return 130


if __name__ == "__main__":
    sys.exit(main())
