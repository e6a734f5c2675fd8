"""Kernel benchmark: the FACD loss of one tap, side by side with what a user would run instead.

Providers: ``eager`` (:func:`facd_fast.reference.contrastive_loss`, the
oracle the tests use, which materialises the (B, B, C, H, W) differences),
``compile`` (``torch.compile`` of that reference, default mode, compiled and
warmed up before timing), ``fused`` (:func:`facd_fast.contrastive_loss`
with ``backend="auto"``: the C++ kernels on CPU, Triton on CUDA), ``fitnet``
(plain feature distillation at the same shape, eager ``F.l1_loss(s, t)`` for
l1 and ``F.mse_loss(s, t)`` for l2: the loss FACD replaces) and, with
``--baseline-csrc DIR``, ``fused-before`` (the C++ kernels of an older
checkout's ``csrc/``, JIT-built under another name; it must have the
pybind API ``feature_distances_out`` / ``feature_distances_backward_out``
of commit f04ec54 and earlier). Modes: ``forward`` and ``forward+backward``
(student gradients; the teacher is frozen, as in training). Shapes: the
paper's EDSR and RCAN taps and a batch sweep at the RCAN tap; float32 and
bfloat16; l1 and l2; in-batch negatives, channel normalisation.

Writes ``kernels.csv`` (kernel, provider, mode, distance, shape, dtype, p20,
p50, p80 in ms of wall time, on CPU cpu_p50 in ms of process CPU time over all
threads, peak_mem and kept_mem in MB, floor in ms, device, versions)
and one PNG per mode into the results folder, and prints a table with the
speedups of the fused kernel.

Floor: the bytes any implementation must move (forward: read s and t;
forward+backward: also write the student gradient) over the memory bandwidth
measured once by a large copy (CPU), or on CUDA the roofline of that and the
pair arithmetic.

Peak memory: on CPU the growth of the resident set during one call (Linux
VmHWM after resetting it through /proc/self/clear_refs, with freed heap
returned to the system first, so every provider pays for what it allocates); on CUDA
``torch.cuda.max_memory_allocated`` above the inputs. Kept memory
(forward+backward): what the forward leaves allocated for the backward
(resident-set growth from before the forward to after it, the output alive).

Timing on a shared machine: ``--pause PATTERN`` stops the processes whose
command line matches PATTERN (``pkill -STOP -f``) while timing, after every
provider is compiled and warmed up, and resumes them after, also on error.

    python -m facd_fast.bench                      # everything (CPU: about 15 minutes)
    python -m facd_fast.bench --shapes edsr rcan --dtypes float32 --providers compile fused
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import signal
import subprocess
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import facd_fast
from facd_fast import reference
from facd_fast.definition import contrastive_ratio

PROVIDERS = ("eager", "compile", "fused", "fitnet")
BASELINE = "fused-before"
MODES = ("forward", "forward+backward")
DISTANCES = ("l1", "l2")
#: name -> (B, C, H, W); the paper's x4 setting (spec section 7) and a batch sweep at the RCAN tap.
SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "edsr": (16, 256, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (4, 8)},
    "rcan": (16, 64, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (32, 64, 128)},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The eager reference materialises B*B*C*H*W elements (three such tensors in
#: its backward); cases above this many bytes of it are skipped and reported.
EAGER_PAIR_BYTES_LIMIT = 1 << 30

# CUDA roofline constants (H100 SXM): FP32 lanes per SM and boost clock; the
# memory bandwidth is measured (a device-to-device copy) rather than assumed.
CUDA_FP32_LANES_PER_SM = 128
CUDA_BOOST_CLOCK_HZ = 1.98e9
#: Arithmetic operations per element of one (student, teacher) pair: l1
#: forward is sub, abs, add; the student backward is sub, two compares, two
#: selects, sub, add (sign(d) weighted), after the forward again.
OPS_PER_PAIR_ELEMENT = {"forward": 3, "forward+backward": 3 + 7}


@dataclass(frozen=True)
class Case:
    shape_name: str
    shape: Tuple[int, int, int, int]
    dtype_name: str
    mode: str
    distance: str = "l1"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        return f"{self.shape_name}-{'x'.join(map(str, self.shape))}-{self.distance}-{self.dtype_name}-{self.mode}"


def cases(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES),
          modes: Sequence[str] = MODES, distances: Sequence[str] = DISTANCES) -> List[Case]:
    return [Case(s, SHAPES[s], d, m, dist) for m in modes for dist in distances for d in dtypes for s in shapes]


class _BaselineDistances(torch.autograd.Function):
    """(d_pos, d_neg) of in-batch negatives with an older build's kernels (its pybind API)."""

    @staticmethod
    def forward(ctx, student, teacher, extension, distance):
        dtype = reference.compute_dtype(student.dtype)
        d_pos = student.new_empty((student.shape[0],), dtype=dtype)
        d_neg = student.new_empty((student.shape[0],), dtype=dtype)
        extension.feature_distances_out(student, teacher, None, distance, "channel", d_pos, d_neg)
        ctx.save_for_backward(student, teacher)
        ctx.extension, ctx.distance = extension, distance
        return d_pos, d_neg

    @staticmethod
    def backward(ctx, grad_pos, grad_neg):
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        ctx.extension.feature_distances_backward_out(grad_pos.contiguous(), grad_neg.contiguous(), student, teacher,
                                                     None, ctx.distance, "channel", grad, None, None)
        return grad, None, None, None


def load_baseline(csrc: str):
    """The C++ kernels of another checkout's csrc/ folder, JIT-built as their own module (cached)."""
    import glob
    import importlib.util

    from torch.utils.cpp_extension import load

    spec = importlib.util.spec_from_file_location("baseline_facd_build", os.path.join(csrc, "facd_build.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    return load("facd_baseline_kernels", sorted(glob.glob(os.path.join(csrc, "*.cpp"))),
                extra_cflags=flags.cxx_flags(), extra_ldflags=flags.ld_flags(), verbose=False)


def loss_function(provider: str, distance: str = "l1", baseline=None) -> Callable:
    """(student, teacher) -> scalar loss for one provider; ``baseline``: :func:`load_baseline`'s module."""
    if provider == "eager":
        return partial(reference.contrastive_loss, distance=distance)
    if provider == "compile":
        return partial(torch.compile(reference.contrastive_loss), distance=distance)
    if provider == "fused":
        return partial(facd_fast.contrastive_loss, distance=distance, backend="auto")
    if provider == "fitnet":
        return F.l1_loss if distance == "l1" else F.mse_loss
    if provider == BASELINE and baseline is not None:
        def before(student, teacher):
            d_pos, d_neg = _BaselineDistances.apply(student, teacher, baseline, distance)
            return contrastive_ratio(d_pos, d_neg, None, 1e-6, "mean").to(student.dtype)
        return before
    raise ValueError(f"provider must be one of {PROVIDERS} (or {BASELINE} with a baseline), got {provider!r}")


def eager_too_large(case: Case) -> bool:
    b, c, h, w = case.shape
    return b * b * c * h * w * torch.finfo(case.dtype).bits // 8 > EAGER_PAIR_BYTES_LIMIT


def make_inputs(case: Case, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    teacher = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    return student.requires_grad_(case.mode == "forward+backward"), teacher


def step_function(loss_fn: Callable, case: Case, student, teacher) -> Callable[[], None]:
    """One timed call: the loss, and its backward to the student in forward+backward."""
    if case.mode == "forward":
        def step():
            with torch.no_grad():
                loss_fn(student, teacher)
    else:
        def step():
            loss_fn(student, teacher).backward()
            student.grad = None
    return step


def time_cpu(step: Callable[[], None], min_reps: int, max_reps: int,
             budget_s: float) -> Tuple[List[float], List[float]]:
    """Wall-clock and process CPU milliseconds (all threads) of at least min_reps calls (more while under budget_s).

    On a shared machine the CPU time is the steadier of the two: other
    processes stretch the wall time of a call, much less the CPU work it does.
    """
    times: List[float] = []
    cpu_times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    return times, cpu_times


def quantiles(times_ms: Sequence[float]) -> Tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=10, method="inclusive")
    return q[1], statistics.median(times_ms), q[7]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))


def peak_rss_mb(step: Callable[[], None]) -> float:
    """Growth of the resident set during one call, in MB (NaN where Linux's counters are missing)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: the call must fault its own pages
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current VmRSS
        before = _status_kb("VmRSS")
    except OSError:
        return math.nan
    step()
    return (_status_kb("VmHWM") - before) / 1024


def peak_cuda_mb(step: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def kept_mb(loss_fn: Callable, student, teacher) -> float:
    """What the forward leaves allocated for the backward: resident-set growth across it, its output alive (MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kb("VmRSS")
    except OSError:
        return math.nan
    loss = loss_fn(student, teacher)
    kept = (_status_kb("VmRSS") - before) / 1024
    del loss
    return kept


def cpu_bandwidth_bytes_per_s() -> float:
    """Measured: the median of 5 copies of a 512 MiB tensor (read + write), on the current threads."""
    source = torch.ones(2**27, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in first
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - t0)
    return 2 * source.numel() * 4 / statistics.median(times)


def bytes_moved(case: Case) -> int:
    """What any implementation must move: read s and t, and (forward+backward) write the student gradient."""
    b, c, h, w = case.shape
    return (2 if case.mode == "forward" else 3) * b * c * h * w * (torch.finfo(case.dtype).bits // 8)


def _ancestors() -> set:
    """This process and its parents (their command lines may hold the pause pattern too)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    return pids


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextmanager
def paused(pattern: Optional[str]):
    """Stops the processes whose command line matches ``pattern`` (as pgrep -f) for the block, resumes them after,
    always; this process and its parents are left alone."""
    if not pattern:
        yield
        return
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout.split()
    pids = [int(pid) for pid in found if int(pid) not in _ancestors()]
    _signal_all(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)


def cuda_bandwidth_bytes_per_s(device: torch.device) -> float:
    """Measured: a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (ms * 1e-3)


def floor_ms(case: Case, bandwidth: float, device: torch.device) -> float:
    """bytes_moved / bandwidth; on CUDA the max with the pair arithmetic over the FP32-lane rate (l1)."""
    memory = bytes_moved(case) / bandwidth
    if device.type != "cuda" or case.distance == "l2":  # l2 in closed form: no pairs
        return memory * 1e3
    b, c, h, w = case.shape
    ops = b * b * c * h * w * OPS_PER_PAIR_ELEMENT[case.mode]
    lanes = torch.cuda.get_device_properties(device).multi_processor_count * CUDA_FP32_LANES_PER_SM
    return max(memory, ops / (lanes * CUDA_BOOST_CLOCK_HZ)) * 1e3


def versions(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"facd_fast {facd_fast.__version__}", f"python {platform.python_version()}"]
    if device.type == "cpu":
        from facd_fast import ops

        parts.append(f"cpp kernels {ops.cpu_capability()}")
        parts.append(f"{torch.get_num_threads()} threads")
    else:
        import triton

        parts.append(f"triton {triton.__version__}")
    return "; ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def prepare(case: Case, provider: str, device: torch.device, baseline=None):
    """(row, step or None): the row's identity, and the warmed-up timed call (None: skipped, said in the note)."""
    row: Dict[str, object] = {"kernel": "facd_contrastive_loss", "provider": provider, "mode": case.mode,
                              "distance": case.distance, "shape": "x".join(map(str, case.shape)),
                              "dtype": case.dtype_name, "device": device_name(device), "versions": versions(device)}
    if provider == "eager" and eager_too_large(case):
        row.update(p20=math.nan, p50=math.nan, p80=math.nan, peak_mem=math.nan,
                   note=f"skipped: materialises more than {EAGER_PAIR_BYTES_LIMIT >> 20} MB")
        return row, None
    student, teacher = make_inputs(case, device)
    loss_fn = loss_function(provider, case.distance, baseline)
    step = step_function(loss_fn, case, student, teacher)
    step()  # compile (for compile), load the kernels, warm caches
    if case.mode == "forward+backward" and device.type == "cpu":
        row["kept_mem"] = kept_mb(loss_fn, student, teacher)
    return row, step


def measure(row: Dict[str, object], step: Callable[[], None], case: Case, device: torch.device, min_reps: int,
            max_reps: int, budget_s: float, bandwidth: float) -> Dict[str, object]:
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(step, quantiles=[0.2, 0.5, 0.8])
        peak = peak_cuda_mb(step, device)
    else:
        times, cpu_times = time_cpu(step, min_reps, max_reps, budget_s)
        p20, p50, p80 = quantiles(times)
        row["cpu_p50"] = statistics.median(cpu_times)
        peak = peak_rss_mb(step)
    row.update(p20=p20, p50=p50, p80=p80, peak_mem=peak, floor=floor_ms(case, bandwidth, device), note="")
    return row


COLUMNS = ["kernel", "provider", "mode", "distance", "shape", "dtype", "p20", "p50", "p80", "cpu_p50", "peak_mem",
           "kept_mem", "floor", "device", "versions", "note"]


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def table(rows: List[Dict[str, object]]) -> str:
    """One line per case: p50 and peak memory of each provider, the floor, and the fused kernel's ratios."""
    by_case: Dict[Tuple, Dict[str, Dict[str, object]]] = {}
    for row in rows:
        by_case.setdefault((row["mode"], row["distance"], row["shape"], row["dtype"]), {})[row["provider"]] = row
    providers = [p for p in (*PROVIDERS, BASELINE) if any(row["provider"] == p for row in rows)]
    header = (f"{'mode':<17}{'dist':<5}{'shape':<15}{'dtype':<9}"
              + "".join(f"{p + ' ms':>16}" for p in providers) + f"{'floor ms':>10}"
              + f"{'x compile':>10}{'/ fitnet':>9}{'/ floor':>8}" + "".join(f"{p + ' MB':>16}" for p in providers))
    lines = [header, "-" * len(header)]
    for (mode, distance, shape, dtype), by_provider in by_case.items():
        p50 = {p: float(by_provider[p]["p50"]) if p in by_provider else math.nan for p in providers}
        mem = {p: float(by_provider[p]["peak_mem"]) if p in by_provider else math.nan for p in providers}
        floor = next((float(r["floor"]) for r in by_provider.values() if r.get("floor") not in (None, "")), math.nan)
        fused = p50.get("fused", math.nan)
        lines.append(f"{mode:<17}{distance:<5}{shape:<15}{dtype:<9}" + "".join(f"{p50[p]:>16.2f}" for p in providers)
                     + f"{floor:>10.2f}{p50.get('compile', math.nan) / fused:>10.1f}"
                     + f"{fused / p50.get('fitnet', math.nan):>9.2f}{fused / floor:>8.1f}"
                     + "".join(f"{mem[p]:>16.0f}" for p in providers))
    return "\n".join(lines)


def plot(rows: List[Dict[str, object]], mode: str, path: Path) -> None:
    """p50 per shape, one line per provider, one panel per dtype (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["distance"], r["dtype"]) for r in rows if r["mode"] == mode})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (distance, dtype) in zip(axes[0], panels):
        selected = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype and r["distance"] == distance]
        shapes = list(dict.fromkeys(r["shape"] for r in selected))
        for provider in (*PROVIDERS, BASELINE):
            values = {r["shape"]: float(r["p50"]) for r in selected if r["provider"] == provider}
            if values:
                ax.plot(range(len(shapes)), [values.get(s, math.nan) for s in shapes], marker="o", label=provider)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"FACD loss, {mode}, {distance}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES), modes: Sequence[str] = MODES,
        providers: Sequence[str] = PROVIDERS, out_dir: str = "bench/results", device: Optional[str] = None,
        min_reps: int = 5, max_reps: int = 30, budget_s: float = 4.0, distances: Sequence[str] = DISTANCES,
        baseline_csrc: Optional[str] = None, pause: Optional[str] = None) -> List[Dict[str, object]]:
    """Measures every case, writes the CSV and the plots, prints the table; returns the rows.

    Every case is prepared (compiled, warmed up) first, then all are timed in
    one go, with the processes matching ``pause`` stopped meanwhile.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    baseline = load_baseline(baseline_csrc) if baseline_csrc else None
    providers = [*providers, *([BASELINE] if baseline is not None and BASELINE not in providers else [])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = []
    for case in cases(shapes, dtypes, modes, distances):
        for provider in providers:
            prepared.append((case, *prepare(case, provider, dev, baseline)))
    rows = []
    with paused(pause):
        bandwidth = cuda_bandwidth_bytes_per_s(dev) if dev.type == "cuda" else cpu_bandwidth_bytes_per_s()
        for case, row, step in prepared:
            t0 = time.perf_counter()
            if step is not None:
                measure(row, step, case, dev, min_reps, max_reps, budget_s, bandwidth)
            rows.append(row)
            print(f"[bench] {case.label:<52} {row['provider']:<13} p50 {float(row['p50']):9.2f} ms  "
                  f"peak {float(row['peak_mem']):8.1f} MB  ({time.perf_counter() - t0:.0f} s) {row['note']}",
                  flush=True)
    suffix = "" if dev.type == "cpu" else f"-{dev.type}"
    write_csv(rows, out / f"kernels{suffix}.csv")
    for mode in modes:
        plot(rows, mode, out / f"kernels{suffix}-{mode.replace('+', '_')}.png")
    print(table(rows))
    print(f"floor: measured bandwidth {bandwidth / 1e9:.1f} GB/s"
          + (f", FP32 lanes x {CUDA_BOOST_CLOCK_HZ / 1e9} GHz" if dev.type == "cuda" else ""))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facd_fast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--distances", nargs="+", choices=list(DISTANCES), default=list(DISTANCES))
    parser.add_argument("--baseline-csrc", default=None,
                        help=f"an older checkout's csrc/ folder: adds the {BASELINE} provider (its kernels)")
    parser.add_argument("--pause", default=None, metavar="PATTERN",
                        help="stop processes whose command line matches PATTERN while timing (resumed after)")
    parser.add_argument("--out", default="bench/results", help="results folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--min-reps", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--max-reps", type=int, default=30, help="timed calls per case, at most")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per case beyond min-reps (CPU)")
    args = parser.parse_args(argv)
    run(args.shapes, args.dtypes, args.modes, args.providers, args.out, args.device, args.min_reps, args.max_reps,
        args.budget, args.distances, args.baseline_csrc, args.pause)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
