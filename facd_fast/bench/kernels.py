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

Writes ``kernels.csv`` (``kernels-cuda.csv`` on CUDA: kernel, provider, mode,
distance, shape, dtype, p20, p50, p80 in ms of wall time, on CPU cpu_p50 in ms
of process CPU time over all threads, peak_mem and kept_mem in MB, floor in ms,
load_before and load_after, device, cpu_model, versions), one row appended as
each entry finishes (a run stopped part-way keeps every finished row), then one
PNG per mode into the results folder, and prints a table with the speedups of
the fused kernel.

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

Timing needs a quiet machine: other work on it stretches every wall time.
The benchmark says so when it starts and records, per row, the 1-minute load
average just before and just after the entry's timed calls and the CPU model,
so that a reader can tell a loaded run from a quiet one. It never stops or
slows other processes.

    python -m facd_fast.bench                      # everything (CPU: about 15 minutes)
    python -m facd_fast.bench --shapes edsr rcan --dtypes float32 --providers compile fused
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .kernel_cases import (
    BASELINE, DISTANCES, DTYPES, EAGER_PAIR_BYTES_LIMIT, MODES, PROVIDERS, SHAPES, Case, cases, eager_too_large,
    load_baseline, loss_function, make_inputs, step_function,
)
from .kernel_results import append_row, csv_path, entry_line, plot, quiet_machine_note, results_suffix, table
from .kernel_timing import CUDA_BOOST_CLOCK_HZ, benchmark_entry, measure_bandwidth, untimed_row, versions

#: What the benchmark's callers use (bench/, tests/, facd bench); the rest is in the kernel_* modules.
__all__ = [
    "BASELINE", "DISTANCES", "DTYPES", "EAGER_PAIR_BYTES_LIMIT", "MODES", "PROVIDERS", "SHAPES", "Case",
    "append_row", "benchmark_entry", "cases", "csv_path", "eager_too_large", "entry_line", "load_baseline",
    "loss_function", "main", "make_inputs", "measure_bandwidth", "quiet_machine_note", "run", "step_function",
    "untimed_row", "versions",
]


def run(shapes: Sequence[str] = tuple(SHAPES), dtypes: Sequence[str] = tuple(DTYPES), modes: Sequence[str] = MODES,
        providers: Sequence[str] = PROVIDERS, out_dir: str = "bench/results", device: Optional[str] = None,
        min_reps: int = 5, max_reps: int = 30, budget_s: float = 4.0, distances: Sequence[str] = DISTANCES,
        baseline_csrc: Optional[str] = None) -> List[Dict[str, object]]:
    """Measures every case, appending each row to the CSV as it finishes; then the plots and the table.

    Returns the rows. Each entry is prepared (compiled, warmed up) and timed
    before the next, so a run stopped part-way has written every finished row.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    baseline = load_baseline(baseline_csrc) if baseline_csrc else None
    providers = [*providers, *([BASELINE] if baseline is not None and BASELINE not in providers else [])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = csv_path(out, dev)
    path.unlink(missing_ok=True)
    print(quiet_machine_note(dev), flush=True)
    bandwidth = measure_bandwidth(dev)
    rows = []
    for case in cases(shapes, dtypes, modes, distances):
        for provider in providers:
            t0 = time.perf_counter()
            row = benchmark_entry(case, provider, dev, bandwidth, min_reps, max_reps, budget_s, baseline)
            append_row(row, path)
            rows.append(row)
            print(entry_line(case, row, time.perf_counter() - t0), flush=True)
    for mode in modes:
        plot(rows, mode, out / f"kernels{results_suffix(dev)}-{mode.replace('+', '_')}.png")
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
    parser.add_argument("--out", default="bench/results", help="results folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--min-reps", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--max-reps", type=int, default=30, help="timed calls per case, at most")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per case beyond min-reps (CPU)")
    args = parser.parse_args(argv)
    run(args.shapes, args.dtypes, args.modes, args.providers, args.out, args.device, args.min_reps, args.max_reps,
        args.budget, args.distances, args.baseline_csrc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
