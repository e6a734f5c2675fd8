"""Training-step benchmark: steps/s of FACD distillation, fused loss vs reference loss.

One case is a student/teacher pair at a patch shape. For each loss backend
("auto", i.e. the fused backend this device has, and "reference") it times
full optimiser steps of ``facd`` distillation on random patches, then the
FACD loss and mask alone (forward + backward of :class:`facd_fast.FACDLoss`
on leaf features of the step's shapes) to give their share of the step.

Shapes: "paper" is spec section 7 (x4, LR 48x48, batch 16, EDSR and RCAN);
"small" is the CPU-sized demo pair (x2, LR 24x24, batch 16). On CPU the
paper shapes take tens of seconds per step, so the default there is "small".
Results go to ``bench/results/train_step.csv`` (one row per case and backend).
"""
from __future__ import annotations

import csv
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import models
from ..api import resolve_backend
from ..module import FACDLoss
from ..train.objective import DistillationObjective
from ..train.precision import autocast_for
from ..train.student import StudentWithAdapters


@dataclass(frozen=True)
class StepCase:
    name: str
    student: str
    teacher: str
    scale: int
    batch: int
    lr_patch: int


CASES = {
    "small": [StepCase("edsr-demo-x2", "edsr-demo-student", "edsr-demo-teacher", 2, 16, 24)],
    "paper": [
        StepCase("edsr-paper-x4", "edsr-student", "edsr-teacher", 4, 16, 48),
        StepCase("rcan-paper-x4", "rcan-student", "rcan-teacher", 4, 16, 48),
    ],
}
CASES["all"] = CASES["small"] + CASES["paper"]
BACKENDS = ("auto", "reference")
FIELDS = [
    "case", "backend", "resolved_backend", "device", "amp", "student", "teacher", "scale", "batch", "lr_patch",
    "steps", "step_ms_p20", "step_ms_p50", "step_ms_p80", "steps_per_s", "loss_ms_p50", "loss_share", "torch", "host",
]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], None], repeats: int, device: torch.device) -> np.ndarray:
    """Milliseconds of each of ``repeats`` calls, after one untimed warm-up call."""
    function()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        _synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return np.asarray(times)


def benchmark_case(case: StepCase, backend: str, steps: int, device: torch.device, amp: str) -> Dict[str, object]:
    """Time ``steps`` distillation steps and the FACD loss + mask alone for one case and loss backend."""
    torch.manual_seed(0)
    student = models.build(case.student, case.scale)
    teacher = models.build(case.teacher, case.scale).to(device).eval().requires_grad_(False)
    adapters = models.DRAdapters(student.num_feat, teacher.num_feat, num_taps=len(student.taps))
    student_with_adapters = StudentWithAdapters(student, adapters, with_features=True)
    student_with_adapters.to(device).to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    objective = DistillationObjective("facd", use_mask=True, backend=backend)
    optimizer = torch.optim.Adam(student_with_adapters.parameters(), lr=1e-4)
    hr_patch = case.lr_patch * case.scale
    lr = torch.rand(case.batch, 3, case.lr_patch, case.lr_patch, device=device).contiguous(memory_format=torch.channels_last)
    hr = torch.rand(case.batch, 3, hr_patch, hr_patch, device=device)

    def step() -> None:
        with autocast_for(device, amp):
            sr, features = student_with_adapters(lr)
            with torch.no_grad():
                sr_teacher, teacher_features = teacher(lr, return_features=True)
            loss, _ = objective(sr, features, sr_teacher, teacher_features, hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_ms = _timed(step, steps, device)

    with torch.no_grad(), autocast_for(device, amp):
        sr_teacher, teacher_features = teacher(lr, return_features=True)
        sr_student, student_features = student_with_adapters(lr)
    leaves = [f.detach().requires_grad_(True) for f in student_features]
    facd = FACDLoss(objective.tap_weights, use_mask=True, backend=backend)

    def loss_and_mask() -> None:
        loss, _ = facd(leaves, [t.to(s.dtype) for s, t in zip(leaves, teacher_features)],
                       sr_student.float(), sr_teacher.float(), hr)
        loss.backward()

    loss_ms = _timed(loss_and_mask, steps, device)
    p20, p50, p80 = np.percentile(step_ms, [20, 50, 80])
    return {
        "case": case.name, "backend": backend, "resolved_backend": resolve_backend(backend, device.type),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "amp": amp, "student": case.student, "teacher": case.teacher, "scale": case.scale, "batch": case.batch,
        "lr_patch": case.lr_patch, "steps": steps, "step_ms_p20": round(p20, 3), "step_ms_p50": round(p50, 3),
        "step_ms_p80": round(p80, 3), "steps_per_s": round(1e3 / p50, 4), "loss_ms_p50": round(float(np.median(loss_ms)), 3),
        "loss_share": round(float(np.median(loss_ms)) / p50, 4), "torch": torch.__version__, "host": platform.node(),
    }


def run_step_benchmark(
    out_dir: str | Path = "bench/results",
    shapes: Optional[str] = None,
    steps: Optional[int] = None,
    device: Optional[str] = None,
) -> List[Dict[str, object]]:
    """Every case of ``shapes`` with both loss backends; prints a table and writes ``train_step.csv``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or ("all" if device.type == "cuda" else "small")
    steps = steps or (20 if device.type == "cuda" else 3)
    if shapes not in CASES:
        raise ValueError(f"shapes must be one of {sorted(CASES)}, got {shapes!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    amp = "bf16" if device.type == "cuda" else "off"
    rows = []
    for case in CASES[shapes]:
        for backend in BACKENDS:
            row = benchmark_case(case, backend, steps, device, amp)
            rows.append(row)
            print(f"{row['case']:<14} {row['backend']:<9} ({row['resolved_backend']:<9}) "
                  f"{row['steps_per_s']:8.3f} steps/s  step {row['step_ms_p50']:9.1f} ms  "
                  f"FACD loss+mask {row['loss_ms_p50']:8.1f} ms ({100 * row['loss_share']:.1f}%)", flush=True)
    out_path = Path(out_dir) / "train_step.csv"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out_path}")
    return rows
