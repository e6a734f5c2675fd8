"""Kernel benchmark: the FACD loss of one tap, three ways, side by side.

Providers: ``eager`` (:func:`facd_fast.reference.contrastive_loss`, the
oracle the tests use, which materialises the (B, B, C, H, W) differences),
``compile`` (``torch.compile`` of that reference, default mode, compiled and
warmed up before timing) and ``fused`` (:func:`facd_fast.contrastive_loss`
with ``backend="auto"``: the C++ kernels on CPU, Triton on CUDA). Modes:
``forward`` and ``forward+backward`` (student gradients; the teacher is
frozen, as in training). Shapes: the paper's EDSR and RCAN taps and a batch
sweep at the RCAN tap; float32 and bfloat16; in-batch negatives, l1, channel
normalisation (the defaults).

Writes ``kernels.csv`` (kernel, provider, mode, shape, dtype, p20, p50, p80
in ms, peak_mem in MB, device, versions, and on CUDA a roofline floor) and
one PNG per mode into the results folder, and prints a table with the
speedups of the fused kernel.

Peak memory: on CPU the growth of the resident set during one call (Linux
VmHWM after resetting it through /proc/self/clear_refs, with freed heap
returned to the system first, so every provider pays for what it allocates); on CUDA
``torch.cuda.max_memory_allocated`` above the inputs.

    python -m facd_fast.bench                      # everything (CPU: about 10 minutes)
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

import torch

import facd_fast
from facd_fast import reference

PROVIDERS = ("eager", "compile", "fused")
MODES = ("forward", "forward+backward")
#: name -> (B, C, H, W); the paper's x4 setting (spec section 7) and a batch sweep at the RCAN tap.
SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "edsr": (16, 256, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (4, 8)},
    "rcan": (16, 64, 48, 48),
    **{f"rcan-B{b}": (b, 64, 48, 48) for b in (32, 64)},
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

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def label(self) -> str:
        return f"{self.shape_name}-{'x'.join(map(str, self.shape))}-{self.dtype_name}-{self.mode}"


def cases(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES),
          modes: Sequence[str] = MODES) -> List[Case]:
    return [Case(s, SHAPES[s], d, m) for m in modes for d in dtypes for s in shapes]


def loss_function(provider: str) -> Callable:
    """(student, teacher) -> scalar loss for one provider."""
    if provider == "eager":
        return reference.contrastive_loss
    if provider == "compile":
        return torch.compile(reference.contrastive_loss)
    if provider == "fused":
        return partial(facd_fast.contrastive_loss, backend="auto")
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


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


def time_cpu(step: Callable[[], None], min_reps: int, max_reps: int, budget_s: float) -> List[float]:
    """Wall-clock milliseconds of at least min_reps calls (more while under budget_s)."""
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


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


def cuda_bandwidth_bytes_per_s(device: torch.device) -> float:
    """Measured: a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench

    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (ms * 1e-3)


def roofline_floor_ms(case: Case, bandwidth: float, device: torch.device) -> float:
    """max(bytes moved / bandwidth, pair-element ops / FP32-lane rate) for the fused kernel."""
    b, c, h, w = case.shape
    elements, element_bytes = b * c * h * w, torch.finfo(case.dtype).bits // 8
    # forward reads s and t; the backward reads them again and writes the student gradient.
    moved = (2 if case.mode == "forward" else 5) * elements * element_bytes
    ops = b * b * c * h * w * OPS_PER_PAIR_ELEMENT[case.mode]
    lanes = torch.cuda.get_device_properties(device).multi_processor_count * CUDA_FP32_LANES_PER_SM
    return max(moved / bandwidth, ops / (lanes * CUDA_BOOST_CLOCK_HZ)) * 1e3


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


def measure(case: Case, provider: str, device: torch.device, min_reps: int, max_reps: int,
            budget_s: float, bandwidth: Optional[float]) -> Dict[str, object]:
    row: Dict[str, object] = {"kernel": "facd_contrastive_loss", "provider": provider, "mode": case.mode,
                              "shape": "x".join(map(str, case.shape)), "dtype": case.dtype_name,
                              "device": device_name(device), "versions": versions(device)}
    if provider == "eager" and eager_too_large(case):
        row.update(p20=math.nan, p50=math.nan, p80=math.nan, peak_mem=math.nan,
                   note=f"skipped: materialises more than {EAGER_PAIR_BYTES_LIMIT >> 20} MB")
        return row
    student, teacher = make_inputs(case, device)
    step = step_function(loss_function(provider), case, student, teacher)
    step()  # compile (for compile), load the kernels, warm caches
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(step, quantiles=[0.2, 0.5, 0.8])
        peak = peak_cuda_mb(step, device)
        row["roofline_floor"] = roofline_floor_ms(case, bandwidth, device)
    else:
        p20, p50, p80 = quantiles(time_cpu(step, min_reps, max_reps, budget_s))
        peak = peak_rss_mb(step)
    row.update(p20=p20, p50=p50, p80=p80, peak_mem=peak, note="")
    return row


COLUMNS = ["kernel", "provider", "mode", "shape", "dtype", "p20", "p50", "p80", "peak_mem", "device", "versions",
           "roofline_floor", "note"]


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def table(rows: List[Dict[str, object]]) -> str:
    """One line per case: p50 and peak memory of each provider, and the fused kernel's speedups."""
    by_case: Dict[Tuple, Dict[str, Dict[str, object]]] = {}
    for row in rows:
        by_case.setdefault((row["mode"], row["shape"], row["dtype"]), {})[row["provider"]] = row
    header = (f"{'mode':<17}{'shape':<15}{'dtype':<9}"
              + "".join(f"{p + ' ms':>12}" for p in PROVIDERS)
              + f"{'x eager':>9}{'x compile':>10}" + "".join(f"{p + ' MB':>12}" for p in PROVIDERS))
    lines = [header, "-" * len(header)]
    for (mode, shape, dtype), by_provider in by_case.items():
        p50 = {p: float(by_provider[p]["p50"]) if p in by_provider else math.nan for p in PROVIDERS}
        mem = {p: float(by_provider[p]["peak_mem"]) if p in by_provider else math.nan for p in PROVIDERS}
        speedup = {p: p50[p] / p50["fused"] for p in ("eager", "compile")}
        lines.append(f"{mode:<17}{shape:<15}{dtype:<9}" + "".join(f"{p50[p]:>12.2f}" for p in PROVIDERS)
                     + f"{speedup['eager']:>9.1f}{speedup['compile']:>10.1f}"
                     + "".join(f"{mem[p]:>12.0f}" for p in PROVIDERS))
    return "\n".join(lines)


def plot(rows: List[Dict[str, object]], mode: str, path: Path) -> None:
    """p50 per shape, one line per provider, one panel per dtype (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows if r["mode"] == mode})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        selected = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
        shapes = list(dict.fromkeys(r["shape"] for r in selected))
        for provider in PROVIDERS:
            values = {r["shape"]: float(r["p50"]) for r in selected if r["provider"] == provider}
            if values:
                ax.plot(range(len(shapes)), [values.get(s, math.nan) for s in shapes], marker="o", label=provider)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"FACD loss, {mode}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES), modes: Sequence[str] = MODES,
        providers: Sequence[str] = PROVIDERS, out_dir: str = "bench/results", device: Optional[str] = None,
        min_reps: int = 5, max_reps: int = 30, budget_s: float = 4.0) -> List[Dict[str, object]]:
    """Measures every case, writes the CSV and the plots, prints the table; returns the rows."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = cuda_bandwidth_bytes_per_s(dev) if dev.type == "cuda" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases(shapes, dtypes, modes):
        for provider in providers:
            t0 = time.perf_counter()
            row = measure(case, provider, dev, min_reps, max_reps, budget_s, bandwidth)
            rows.append(row)
            print(f"[bench] {case.label:<48} {provider:<8} p50 {float(row['p50']):9.2f} ms  "
                  f"peak {float(row['peak_mem']):8.1f} MB  ({time.perf_counter() - t0:.0f} s) {row['note']}",
                  flush=True)
    suffix = "" if dev.type == "cpu" else f"-{dev.type}"
    write_csv(rows, out / f"kernels{suffix}.csv")
    for mode in modes:
        plot(rows, mode, out / f"kernels{suffix}-{mode.replace('+', '_')}.png")
    print(table(rows))
    if bandwidth is not None:
        print(f"roofline: measured bandwidth {bandwidth / 1e9:.0f} GB/s, FP32 lanes x {CUDA_BOOST_CLOCK_HZ / 1e9} GHz")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facd_fast.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--out", default="bench/results", help="results folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--min-reps", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--max-reps", type=int, default=30, help="timed calls per case, at most")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per case beyond min-reps (CPU)")
    args = parser.parse_args(argv)
    run(args.shapes, args.dtypes, args.modes, args.providers, args.out, args.device, args.min_reps, args.max_reps,
        args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
