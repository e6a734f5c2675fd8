"""The kernel benchmark's output: the CSV rows as they finish, the progress lines, the table and the plots."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .kernel_cases import BASELINE, PROVIDERS, Case
from .kernel_timing import cpu_model, device_name, load_average

COLUMNS = ["kernel", "provider", "mode", "distance", "shape", "dtype", "p20", "p50", "p80", "cpu_p50", "peak_mem",
           "kept_mem", "floor", "load_before", "load_after", "device", "cpu_model", "versions", "note"]


def append_row(row: Dict[str, object], path: Path) -> None:
    """Appends ``row`` to the CSV at ``path`` (its header first if the file is new or empty), then closes the file:
    a run stopped later keeps every row written before."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def entry_line(case: Case, row: Dict[str, object], seconds: float) -> str:
    """The progress line of one finished entry."""
    return (f"[bench] {case.label:<52} {row['provider']:<13} p50 {float(row['p50']):9.2f} ms  "
            f"peak {float(row['peak_mem']):8.1f} MB  load {float(row.get('load_before', math.nan)):.1f}"
            f"->{float(row.get('load_after', math.nan)):.1f}  ({seconds:.0f} s) {row['note']}")


def quiet_machine_note(device: torch.device) -> str:
    """What the benchmark needs and what it found: said before any timing."""
    return (f"[bench] timings need a quiet machine; now: 1-minute load average {load_average():.2f} on "
            f"{os.cpu_count()} cores ({cpu_model()}), device {device_name(device)}")


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


def results_suffix(device: torch.device) -> str:
    """What a run on ``device`` adds to its file names: nothing on CPU, ``-cuda`` on CUDA."""
    return "" if device.type == "cpu" else f"-{device.type}"


def csv_path(out_dir, device: torch.device) -> Path:
    """Where a run on ``device`` writes its rows: ``kernels.csv`` on CPU, ``kernels-cuda.csv`` on CUDA."""
    return Path(out_dir) / f"kernels{results_suffix(device)}.csv"
