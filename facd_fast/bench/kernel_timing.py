"""Timing one entry of the kernel benchmark: wall and CPU times, peak and kept memory, the floor, the machine.

The row of an entry says what was timed, where and with which versions, and
what the machine's load was around the timing (:mod:`facd_fast.bench.kernels`
says how each number is measured).
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import facd_fast

from .kernel_cases import EAGER_PAIR_BYTES_LIMIT, Case, eager_too_large, loss_function, make_inputs, step_function

# CUDA roofline constants (H100 SXM): FP32 lanes per SM and boost clock; the
# memory bandwidth is measured (a device-to-device copy) rather than assumed.
CUDA_FP32_LANES_PER_SM = 128
CUDA_BOOST_CLOCK_HZ = 1.98e9
#: Arithmetic operations per element of one (student, teacher) pair: l1
#: forward is sub, abs, add; the student backward is sub, two compares, two
#: selects, sub, add (sign(d) weighted), after the forward again.
OPS_PER_PAIR_ELEMENT = {"forward": 3, "forward+backward": 3 + 7}


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


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the system gives none): other work beside a timing."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo on Linux (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def entry_row(case: Case, provider: str, device: torch.device) -> Dict[str, object]:
    """A row's identity: what is timed, where, with which versions; the measurements are added to it."""
    return {"kernel": "facd_contrastive_loss", "provider": provider, "mode": case.mode, "distance": case.distance,
            "shape": "x".join(map(str, case.shape)), "dtype": case.dtype_name, "device": device_name(device),
            "cpu_model": cpu_model(), "versions": versions(device)}


def untimed_row(case: Case, provider: str, device: torch.device, note: str) -> Dict[str, object]:
    """The row of an entry that was not timed (skipped, or broken), ``note`` saying why."""
    row = entry_row(case, provider, device)
    row.update(p20=math.nan, p50=math.nan, p80=math.nan, peak_mem=math.nan, note=note)
    return row


def prepare(case: Case, provider: str, device: torch.device, baseline=None, compile_backend: str = "inductor"):
    """(row, step or None): the row's identity, and the warmed-up timed call (None: skipped, said in the note)."""
    if provider == "eager" and eager_too_large(case):
        return untimed_row(case, provider, device,
                           f"skipped: materialises more than {EAGER_PAIR_BYTES_LIMIT >> 20} MB"), None
    row = entry_row(case, provider, device)
    if provider == "compile" and compile_backend != "inductor":
        row["versions"] = f"{row['versions']}; torch.compile backend={compile_backend}"
    student, teacher = make_inputs(case, device)
    loss_fn = loss_function(provider, case.distance, baseline, compile_backend)
    step = step_function(loss_fn, case, student, teacher)
    step()  # compile (for compile), load the kernels, warm caches
    if case.mode == "forward+backward" and device.type == "cpu":
        row["kept_mem"] = kept_mb(loss_fn, student, teacher)
    return row, step


def measure(row: Dict[str, object], step: Callable[[], None], case: Case, device: torch.device, min_reps: int,
            max_reps: int, budget_s: float, bandwidth: float) -> Dict[str, object]:
    """Times ``step`` into ``row``: quantiles, peak memory, the floor, and the load average around the timing."""
    row["load_before"] = load_average()
    if device.type == "cuda":
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(step, quantiles=[0.2, 0.5, 0.8])
        peak = peak_cuda_mb(step, device)
    else:
        times, cpu_times = time_cpu(step, min_reps, max_reps, budget_s)
        p20, p50, p80 = quantiles(times)
        row["cpu_p50"] = statistics.median(cpu_times)
        peak = peak_rss_mb(step)
    row.update(p20=p20, p50=p50, p80=p80, peak_mem=peak, floor=floor_ms(case, bandwidth, device),
               load_after=load_average(), note="")
    return row


def benchmark_entry(case: Case, provider: str, device: torch.device, bandwidth: float, min_reps: int = 5,
                    max_reps: int = 30, budget_s: float = 4.0, baseline=None,
                    compile_backend: str = "inductor") -> Dict[str, object]:
    """One row: ``provider`` on ``case``, prepared (compiled, warmed up) and timed; its inputs freed after."""
    row, step = prepare(case, provider, device, baseline, compile_backend)
    if step is not None:
        measure(row, step, case, device, min_reps, max_reps, budget_s, bandwidth)
    if provider == "compile":
        # Dynamo keeps every graph it compiled for the reference's code, and past its recompile limit (8) runs
        # the rest eagerly: each case's compile starts from an empty cache, as a user's program would
        torch._dynamo.reset()
    return row


def measure_bandwidth(device: torch.device) -> float:
    """The memory bandwidth of ``device`` in bytes/s (a large copy), for the floor."""
    return cuda_bandwidth_bytes_per_s(device) if device.type == "cuda" else cpu_bandwidth_bytes_per_s()
