"""Latency benchmark: what a distilled student buys in speed, next to what it costs in quality.

Models: the demo's x2 teacher (the shipped checkpoint) and the students that
``facd demo`` exported (``<demo-dir>/student_<method>.pth``), each with its
Y-PSNR on the demo's held-out photos (the protocol of ``facd eval``); and, at
x4, networks built from presets with random weights (latency only: their
quality column is empty). Inputs: 256x256 at x2 and 320x180 at x4 (a 720p
output), batch 1, float32, on the CPU.

Providers: ``eager`` (PyTorch, ``torch.no_grad``), ``compile``
(``torch.compile``, default mode, compiled for the thread count it is timed
at, since Inductor's CPU kernels fix their thread count when generated) and
``onnxruntime`` (the ONNX export of :func:`facd_fast.deploy.onnx_export.export_onnx`,
checked against PyTorch on a real photo when written; ONNX Runtime's CPU
provider with that many intra-op threads). Thread counts: 1 and 2.

The providers take turns (one forward each per round, at least 3 rounds),
so a change in the machine's load falls on all of them alike. Each row:
median, p20 and p80 of the timed forwards (after one untimed warm-up), images/s = 1000 / median, parameters, FLOPs of one forward
counted by ``torch.utils.flop_counter`` (2 per multiply-add), and the
machine's 1-minute load average at the end of the timed loop (on a shared
machine, other work inflates the times, the 2-thread ones most). Writes
``latency.csv`` and ``latency.png`` (Y-PSNR against median latency) into the
results folder.

    facd bench --latency [--demo-dir runs/demo] [--out bench/results]
"""
from __future__ import annotations

import contextlib
import csv
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import data, models
from ..deploy.onnx_export import export_onnx, onnx_session
from .kernel_timing import quantiles

PROVIDERS = ("eager", "compile", "onnxruntime")
THREADS = (1, 2)
#: scale -> (height, width) of the LR input.
INPUTS = {2: (256, 256), 4: (180, 320)}
#: The x4 networks, built from presets with random weights (no trained x4 model exists in this repository).
X4_PRESETS = ("edsr-demo-teacher", "edsr-demo-student", "edsr-student", "rcan-student")
DEMO_STUDENTS = ("none", "fd-l1", "facd")
FIELDS = ["model", "weights", "scale", "input", "params", "gflops", "psnr_y", "provider", "threads", "reps",
          "median_ms", "p20_ms", "p80_ms", "images_per_s", "load_1min", "versions", "host"]


@dataclass
class LatencyModel:
    name: str
    network: nn.Module
    weights: str  # "trained: <file>" or "random init"
    psnr_y: Optional[float]


def count_flops(network: nn.Module, lr: torch.Tensor) -> int:
    """FLOPs of one forward of ``network`` on ``lr`` (torch.utils.flop_counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(lr)
    return counter.get_total_flops()


def demo_models(demo_dir: str | Path, teacher_checkpoint: str | Path, val_dir: Path) -> List[LatencyModel]:
    """The demo's x2 teacher and students, with their Y-PSNR on the held-out photos in ``val_dir``."""
    from ..train.evaluate import evaluate, open_benchmark

    demo_dir = Path(demo_dir)
    entries = [("teacher (EDSR 8x64)", Path(teacher_checkpoint))]
    entries += [(f"student {method} (EDSR 4x32)", demo_dir / f"student_{method}.pth") for method in DEMO_STUDENTS]
    missing = [str(path) for _, path in entries if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"latency benchmark: {missing} not found; run `facd demo --out {demo_dir}` first")
    folder = open_benchmark(val_dir, 2)
    result = []
    for name, path in entries:
        network = models.model_from_checkpoint(path).eval()
        psnr = evaluate(network, folder, 2)["mean_psnr_y"]
        result.append(LatencyModel(name, network, f"trained: {path.name}", psnr))
    return result


def random_x4_models(presets: Sequence[str] = X4_PRESETS) -> List[LatencyModel]:
    result = []
    for preset in presets:
        torch.manual_seed(0)
        result.append(LatencyModel(f"{preset} x4", models.build(preset, 4).eval(), "random init", None))
    return result


def _runner(model: LatencyModel, provider: str, threads: int, lr: torch.Tensor, onnx_path: Path) -> Callable[[], None]:
    """A call running one forward of ``model`` with ``provider`` at ``threads`` threads, warmed up once."""
    torch.set_num_threads(threads)
    if provider == "eager":
        def forward() -> None:
            with torch.no_grad():
                model.network(lr)
    elif provider == "compile":
        torch._dynamo.reset()  # recompile: Inductor's CPU kernels fix their thread count at code generation
        compiled = torch.compile(model.network)

        def forward() -> None:
            with torch.no_grad():
                compiled(lr)
    elif provider == "onnxruntime":
        session = onnx_session(onnx_path, threads=threads)
        feed = {session.get_inputs()[0].name: lr.numpy()}

        def forward() -> None:
            session.run(None, feed)
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    forward()
    return forward


def time_interleaved(forwards: Dict[str, Callable[[], None]], min_reps: int, max_reps: int,
                     budget_s: float) -> Dict[str, List[float]]:
    """Milliseconds of each call, the providers taking turns, one call each per round.

    A change in the machine's load then falls on every provider alike, so the
    providers' medians compare side by side. At least ``min_reps`` rounds,
    more while under ``budget_s`` seconds, at most ``max_reps``.
    """
    times: Dict[str, List[float]] = {name: [] for name in forwards}
    started = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - started < budget_s):
        for name, forward in forwards.items():
            call_started = time.perf_counter()
            forward()
            times[name].append((time.perf_counter() - call_started) * 1e3)
        rounds += 1
    return times


def _versions() -> str:
    import onnxruntime

    return f"torch {torch.__version__}; onnxruntime {onnxruntime.__version__}; python {platform.python_version()}"


def benchmark_models(latency_models: Sequence[LatencyModel], scale: int, onnx_dir: Optional[Path] = None, *,
                     providers: Sequence[str] = PROVIDERS, threads: Sequence[int] = THREADS, min_reps: int = 3,
                     max_reps: int = 20, budget_s: float = 5.0,
                     timing_guard: Callable[[], ContextManager] = contextlib.nullcontext) -> List[Dict[str, object]]:
    """Rows of :data:`FIELDS` for every model x provider x thread count at the input of ``scale``.

    ``timing_guard()`` is entered around each timed loop only (not around
    exports, compilation or warm-up), e.g. to log what else the machine runs
    meanwhile; like the kernel benchmark, this one stops no other process.
    The ONNX exports go to ``onnx_dir`` (default: a temporary folder, removed after).
    """
    height, width = INPUTS[scale]
    torch.manual_seed(0)
    lr = torch.rand(1, 3, height, width)
    rows = []
    initial_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if onnx_dir is None:
            onnx_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facd-latency-")))
        stack.callback(torch._dynamo.reset)
        stack.callback(torch.set_num_threads, initial_threads)
        for model in latency_models:
            if model.network.scale != scale:
                raise ValueError(f"{model.name} is a x{model.network.scale} model, expected x{scale}")
            onnx_path = Path(onnx_dir) / f"{model.name.split(' (')[0].replace(' ', '_')}-x{scale}.onnx"
            if "onnxruntime" in providers:
                export_onnx(model.network, onnx_path)
            flops = count_flops(model.network, lr)
            for thread_count in threads:
                forwards = {provider: _runner(model, provider, thread_count, lr, onnx_path)
                            for provider in providers}
                with timing_guard():
                    all_times = time_interleaved(forwards, min_reps, max_reps, budget_s)
                    load = os.getloadavg()[0]  # other work on the machine while timing, for the reader
                for provider, times in all_times.items():
                    p20, p50, p80 = quantiles(times)
                    rows.append({
                        "model": model.name, "weights": model.weights, "scale": scale, "input": f"{width}x{height}",
                        "params": models.count_parameters(model.network), "gflops": round(flops / 1e9, 2),
                        "psnr_y": "" if model.psnr_y is None else round(model.psnr_y, 3), "provider": provider,
                        "threads": thread_count, "reps": len(times), "median_ms": round(p50, 3),
                        "p20_ms": round(p20, 3), "p80_ms": round(p80, 3), "images_per_s": round(1e3 / p50, 3),
                        "load_1min": round(load, 2),
                        "versions": _versions(), "host": f"{platform.machine()}, {os.cpu_count()} cores",
                    })
                    print(f"[latency] {model.name:<28} x{scale} {provider:<11} {thread_count} thr "
                          f"{p50:9.1f} ms ({len(times)} reps)", flush=True)
    return rows


def write_csv(rows: Sequence[Dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    """One line per model: params, GFLOPs, Y-PSNR and the median ms of each provider x thread count."""
    measured = {(r["provider"], int(r["threads"])) for r in rows}
    columns = [(p, t) for p in PROVIDERS for t in THREADS if (p, t) in measured]
    header = ["model", "input -> output", "weights", "params", "GFLOPs", "Y-PSNR (dB)"]
    header += [f"{p} {t}T (ms)" for p, t in columns] + ["best img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in dict.fromkeys((r["model"], int(r["scale"])) for r in rows):
        selected = [r for r in rows if (r["model"], int(r["scale"])) == model]
        first = selected[0]
        width, height = map(int, str(first["input"]).split("x"))
        scale = int(first["scale"])
        cells = [first["model"], f"{width}x{height} -> {width * scale}x{height * scale}",
                 "trained" if str(first["weights"]).startswith("trained") else "random init",
                 f"{int(first['params']) / 1e3:.0f}k", f"{float(first['gflops']):.1f}",
                 f"{float(first['psnr_y']):.3f}" if first["psnr_y"] != "" else "-"]
        for provider, thread_count in columns:
            match = [r for r in selected if r["provider"] == provider and int(r["threads"]) == thread_count]
            cells.append(f"{float(match[0]['median_ms']):.0f}" if match else "")
        cells.append(f"{max(float(r['images_per_s']) for r in selected):.2f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, object]], path: Path) -> Optional[Path]:
    """Y-PSNR against median latency, one marker per provider and thread count, for the models with a PSNR."""
    rated = [r for r in rows if r["psnr_y"] != ""]
    if not rated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"eager": "o", "compile": "s", "onnxruntime": "^"}
    for provider in PROVIDERS:
        for thread_count, fill in zip(THREADS, ("none", "full")):
            points = [r for r in rated if r["provider"] == provider and int(r["threads"]) == thread_count]
            if points:
                ax.scatter([float(r["median_ms"]) for r in points], [float(r["psnr_y"]) for r in points],
                           marker=markers[provider], label=f"{provider}, {thread_count} thread(s)",
                           facecolors="none" if fill == "none" else None,
                           edgecolors=f"C{PROVIDERS.index(provider)}", c=None if fill == "none" else
                           f"C{PROVIDERS.index(provider)}")
    for index, name in enumerate(dict.fromkeys(r["model"] for r in rated)):
        fastest = min((r for r in rated if r["model"] == name), key=lambda r: float(r["median_ms"]))
        # Staggered upwards: the students of one architecture sit within hundredths of a dB.
        ax.annotate(name, (float(fastest["median_ms"]), float(fastest["psnr_y"])), fontsize=7,
                    xytext=(4, 4 + 10 * index), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5})
    first = rated[0]
    ax.set_xscale("log")
    ax.set_xlabel(f"median latency (ms), {first['input']} input, x{first['scale']}, CPU, batch 1, float32")
    ax.set_ylabel("Y-PSNR on the demo's held-out photos (dB)")
    ax.set_title("Quality against latency: the demo teacher and its distilled students")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: str | Path = "bench/results", demo_dir: str | Path = "runs/demo",
        teacher_checkpoint: Optional[str | Path] = None, builtin_root: str | Path = "datasets/builtin",
        x4_presets: Sequence[str] = X4_PRESETS, providers: Sequence[str] = PROVIDERS,
        threads: Sequence[int] = THREADS, min_reps: int = 3, max_reps: int = 20, budget_s: float = 5.0,
        timing_guard: Callable[[], ContextManager] = contextlib.nullcontext) -> List[Dict[str, object]]:
    """The whole benchmark: writes ``latency.csv`` and ``latency.png`` into ``out_dir``; returns the rows."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if teacher_checkpoint is None:
        teacher_checkpoint = demo_teacher_checkpoint()
    _, val_dir = data.write_builtin_photos(builtin_root)
    cases = [(model, 2) for model in demo_models(demo_dir, teacher_checkpoint, val_dir)]
    cases += [(model, 4) for model in random_x4_models(x4_presets)]
    rows: List[Dict[str, object]] = []
    for model, scale in cases:
        rows += benchmark_models([model], scale, providers=providers, threads=threads, min_reps=min_reps,
                                 max_reps=max_reps, budget_s=budget_s, timing_guard=timing_guard)
        write_csv(rows, out_dir / "latency.csv")  # after each model: an interrupted run keeps what it measured
    plot(rows, out_dir / "latency.png")
    print(markdown_table(rows))
    print(f"[latency] wrote {out_dir / 'latency.csv'} and {out_dir / 'latency.png'} "
          f"in {time.perf_counter() - started:.0f} s")
    return rows



def demo_teacher_checkpoint() -> Path:
    """The teacher checkpoint of the demo config (the shipped one), found where ``facd demo`` finds it."""
    from ..resources import resolve_path
    from ..train.config import load_config
    from ..train.demo import DEMO_CONFIG

    return resolve_path(load_config(DEMO_CONFIG, [])["model"]["teacher_checkpoint"])
