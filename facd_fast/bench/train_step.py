"""Training-step benchmark: where a distillation step's time goes, per method and setting.

Each case is a real run (:class:`facd_fast.train.trainer.Trainer` on a
config, on its data) whose steps are timed phase by phase
(:class:`facd_fast.train.step_timer.StepTimer`): data, teacher forward,
student forward (with its taps and DR adapters), the adaptive mask, each
objective term, the gradient diagnostics of log steps, backward, the
divergence guard, the optimiser, the EMA and the log; "other" is what the
phases leave out of the step's wall time. Validation and checkpoints are
left out (they come every few hundred steps).

Cases are methods (default none, fd-l1, facd) crossed with variants, named
sets of config overrides (default: the config as it is, and "fp32": the
teacher and the student in float32, as every run was before
``distill.teacher_precision``). All cases are built first, then timed in
rounds, a few steps each in turn, so a change in the machine's load falls on
all of them alike. Settings: "demo" (the demo config, x2 on the built-in
photos, CPU-sized) and "paper" (the paper's setting: x4, HR 192, batch 16, the
paper's EDSR pair, randomly initialised teacher; for a GPU).

Writes ``train_step.csv`` (one row per case and phase) and
``train_step.png`` (a stacked bar per case). It needs a quiet machine: the
1-minute load average before and after is in every row.
"""
from __future__ import annotations

import csv
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import models
from ..train.config import load_config
from ..train.step_timer import StepTimer

SETTINGS = {
    "demo": ("demo", []),
    "paper": ("edsr_x4", ["data.train_hr_dir=builtin", "data.val_hr_dir=", "train.batch_size=16",
                          "data.patch_size=192", "data.repeat=64"]),
}
METHODS = ("none", "fd-l1", "facd")
VARIANTS = {"default": [], "fp32": ["distill.teacher_precision=fp32", "train.amp=off"]}
#: Phases in the order of a step (the objective's terms come as "term:<name>").
PHASES = ("data", "teacher", "student", "mask", "term:pixel", "term:output", "term:fd-l1", "term:facd",
          "diagnostics", "backward", "guard", "optimizer", "ema", "log")
FIELDS = ["setting", "method", "variant", "phase", "ms_per_step", "share", "step_ms_mean", "step_ms_p20",
          "step_ms_p50", "step_ms_p80", "steps", "teacher_precision", "amp", "batch", "lr_patch", "scale",
          "threads", "device", "cpu", "torch", "load_before", "load_after", "overrides"]


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's), to stand beside every CPU timing."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (NaN where the system does not say)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return float("nan")


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"name=section.key=value;section.key=value"`` -> (name, overrides); ``"name="`` is the config as it is."""
    name, _, overrides = text.partition("=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {text!r} must look like NAME=section.key=value[;section.key=value...]")
    sets = [part.strip() for part in overrides.split(";") if part.strip()]
    load_config(None, sets)  # a typo in a key or a bad value fails here, before anything is built
    return name, sets


def _paper_teacher(folder: Path, config_name: str) -> str:
    """A randomly initialised teacher checkpoint of the paper config (speed does not depend on the weights)."""
    config = load_config(config_name)
    path = folder / "random-teacher.pth"
    models.save_checkpoint_basicsr(models.build(config["model"]["teacher"], config["model"]["scale"]), path)
    return str(path)


def build_cases(setting: str, methods: Sequence[str], variants: Dict[str, List[str]], folder: Path,
                device: str, sets: Sequence[str] = ()) -> List[Dict]:
    """One :class:`Trainer` per (method, variant), in ``folder``; its config is the setting's plus the overrides."""
    from ..train.trainer import Trainer

    if setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    config_name, base = SETTINGS[setting]
    base = [*base, f"data.builtin_root={folder / 'builtin'}"]
    if setting == "paper":
        base.append(f"model.teacher_checkpoint={_paper_teacher(folder, config_name)}")
    cases = []
    for variant, overrides in variants.items():
        for method in methods:
            sets_here = [*base, *sets, *overrides, f"distill.method={method}", f"run.device={device}",
                         f"run.out_dir={folder / variant}", "train.val_every=1000000000",
                         "train.checkpoint_every=1000000000", "train.iterations=1000000000", "train.plots=false",
                         "train.progress=false"]
            config = load_config(config_name, sets_here)
            trainer = Trainer(config, mode="distill", overwrite=True, timer=StepTimer(torch.device(device)))
            trainer._prepare_out_dir()
            cases.append({"method": method, "variant": variant, "trainer": trainer, "batches": trainer._batches(),
                          "overrides": [*sets, *overrides], "step_ms": [], "phases": {}})
    return cases


def _time_steps(case: Dict, steps: int, record: bool) -> None:
    trainer = case["trainer"]
    trainer.timer.enabled = record
    for _ in range(steps):
        started = time.perf_counter()
        trainer.iteration(case["batches"])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        if record:
            case["step_ms"].append((time.perf_counter() - started) * 1e3)
    for phase, seconds in trainer.timer.reset().items():
        case["phases"][phase] = case["phases"].get(phase, 0.0) + seconds


def run(out_dir: str | Path = "bench/results", setting: Optional[str] = None, methods: Sequence[str] = METHODS,
        variants: Optional[Dict[str, List[str]]] = None, steps: int = 60, rounds: int = 4,
        device: Optional[str] = None, sets: Sequence[str] = ()) -> List[Dict[str, object]]:
    """Time every case ``rounds`` times ``steps`` steps (after a warm-up), print the table, write CSV and plot."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    setting = setting or ("paper" if device.startswith("cuda") else "demo")
    if steps < 1 or rounds < 1:
        raise ValueError(f"--steps and --rounds must be >= 1, got {steps} and {rounds}")
    variants = dict(VARIANTS if variants is None else variants)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="facd-bench-") as folder:
        cases = build_cases(setting, methods, variants, Path(folder), device, sets)
        warmup = max(3, min(steps, 10))
        for case in cases:
            _time_steps(case, warmup, record=False)
        load_before = load_average()
        for round_index in range(rounds):
            for case in cases:
                _time_steps(case, steps, record=True)
            # Rewritten after every round: a run stopped part-way keeps the rounds it finished.
            rows = [row for case in cases for row in _case_rows(case, setting, device, load_before, load_average())]
            write_outputs(rows, out, show=round_index == rounds - 1)
    return rows


def _case_rows(case: Dict, setting: str, device: str, load_before: float, load_after: float) -> List[Dict]:
    trainer = case["trainer"]
    config, steps = trainer.config, len(case["step_ms"])
    step_ms = np.asarray(case["step_ms"])
    mean = float(step_ms.mean())
    phases = {phase: 1e3 * seconds / steps for phase, seconds in case["phases"].items()}
    phases["other"] = max(0.0, mean - sum(phases.values()))
    ordered = [p for p in PHASES if p in phases] + sorted(set(phases) - set(PHASES) - {"other"}) + ["other"]
    p20, p50, p80 = np.percentile(step_ms, [20, 50, 80])
    common = {
        "setting": setting, "method": case["method"], "variant": case["variant"], "step_ms_mean": round(mean, 3),
        "step_ms_p20": round(float(p20), 3), "step_ms_p50": round(float(p50), 3), "step_ms_p80": round(float(p80), 3),
        "steps": steps, "teacher_precision": trainer.model.teacher_precision if trainer.teacher is not None else "-",
        "amp": config["train"]["amp"], "batch": config["train"]["batch_size"],
        "lr_patch": config["data"]["patch_size"] // config["model"]["scale"], "scale": config["model"]["scale"],
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "cpu": cpu_name(), "torch": torch.__version__, "load_before": load_before, "load_after": load_after,
        "overrides": " ".join(case["overrides"]),
    }
    return [{**common, "phase": phase, "ms_per_step": round(phases[phase], 3),
             "share": round(phases[phase] / mean, 4)} for phase in ordered]


def summary_table(rows: List[Dict]) -> str:
    """Markdown: a row per case (mean step ms, then ms per step of each phase), and the ratio to the first variant."""
    cases: Dict[Tuple[str, str], Dict[str, Dict]] = {}
    for row in rows:
        cases.setdefault((row["method"], row["variant"]), {})[row["phase"]] = row
    phases = [p for p in (*PHASES, "other") if any(p in c for c in cases.values())]
    extra = sorted({p for c in cases.values() for p in c} - set(phases))
    phases = phases[:-1] + extra + ["other"]
    header = ["method", "variant", "teacher", "step ms (mean)", "p50", *phases]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, variant), by_phase in cases.items():
        first = next(iter(by_phase.values()))
        cells = [method, variant, str(first["teacher_precision"]), f"{first['step_ms_mean']:.1f}",
                 f"{first['step_ms_p50']:.1f}", *(f"{by_phase[p]['ms_per_step']:.2f}" if p in by_phase else "-"
                                                  for p in phases)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: List[Dict], out: Path, show: bool = True) -> None:
    """The CSV and the plot (``train_step[-cuda].csv/.png``); ``show`` prints the table too."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if rows[0]["device"] == "cpu" else "-cuda"
    with (out / f"train_step{suffix}.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_breakdown(rows, out / f"train_step{suffix}.png")
    if not show:
        return
    first = rows[0]
    print(f"\n{first['setting']} setting, x{first['scale']}, batch {first['batch']}, LR patch {first['lr_patch']}, "
          f"{first['threads']} thread(s), {first['device']} ({first['cpu']}), torch {first['torch']}, load "
          f"{first['load_before']} -> {first['load_after']}; ms per step (mean over {first['steps']} steps):")
    print(summary_table(rows))
    print(f"wrote {out / f'train_step{suffix}.csv'} and train_step{suffix}.png")


def plot_breakdown(rows: List[Dict], out_png: Path) -> Path:
    """One stacked bar per case: the milliseconds of each phase of a step."""
    from ..train.plots import _pyplot

    plt = _pyplot()
    cases: Dict[str, Dict[str, float]] = {}
    for row in rows:
        cases.setdefault(f"{row['method']}\n{row['variant']}", {})[row["phase"]] = float(row["ms_per_step"])
    seen = set(row["phase"] for row in rows)
    phases = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES) - {"other"}) + ["other"]
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(cases) + 3), 4.5))
    bottoms = np.zeros(len(cases))
    for index, phase in enumerate(phases):
        heights = np.array([case.get(phase, 0.0) for case in cases.values()])
        axis.bar(range(len(cases)), heights, bottom=bottoms, label=phase, color=plt.get_cmap("tab20")(index % 20))
        bottoms += heights
    first = rows[0]
    axis.set_xticks(range(len(cases)), list(cases), fontsize=8)
    axis.set_ylabel("ms per step (mean)")
    axis.set_title(f"{first['setting']}: x{first['scale']}, batch {first['batch']}, LR {first['lr_patch']}, "
                   f"{first['device']} {first['cpu'] if first['device'] == 'cpu' else ''}", fontsize=9)
    axis.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
