"""``facd study``: a grid of distillation runs (method x seed x sweep point), evaluated and compared in pairs.

Each run is an ordinary ``facd distill`` run of one config with its own
``run.out_dir`` (``OUT/runs/<method>[__key=value...]/seed<k>``), trained in
a child process (``python -m facd_fast.train.study RUN_DIR``, at most
``jobs`` at once) and resumed from its last checkpoint if a previous study
was interrupted. The child then evaluates the exported student by the exact
protocol (:func:`facd_fast.train.evaluate.evaluate`) on every evaluation
folder and writes ``RUN_DIR/result.json``; a run whose result already holds
every requested evaluation is skipped, one that lacks an evaluation only
evaluates.

Runs with the same seed start from the same student weights and see the same
patches in the same order whatever the method (the trainer seeds the DR
adapters and every crop apart from the global RNG), so methods are compared
seed by seed: ``study.json`` holds a row per run, per method and sweep point
n / mean / std / 95% CI, and paired differences against the baseline method
and between the other methods; ``study.md`` the same as tables; ``study_<eval>.png``
the seeds, means and intervals.

Sweep keys of the ``distill`` section do not change a ``none`` run (the student
alone has no distillation term), so the ``none`` runs are shared by every
sweep point that differs only there.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import resources
from .config import METHODS, ConfigError, load_config
from .study_stats import paired_difference, summarize, verdict

SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"


# --- the grid --------------------------------------------------------------------------------------
def split_values(text: str) -> List[str]:
    """``"0.01,0.1"`` -> ["0.01", "0.1"]; commas inside brackets or quotes do not split (``[1,0,0],[0,0,1]``)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    if any(not v for v in values):
        raise ConfigError(f"--sweep values {text!r}: an empty value (check the commas)")
    return values


def parse_sweep(text: str) -> Tuple[str, List[str]]:
    """``"distill.lambda=0.01,0.1"`` -> ("distill.lambda", ["0.01", "0.1"]), each value checked against the config keys."""
    if "=" not in text:
        raise ConfigError(f"--sweep {text!r} must look like section.key=value1,value2,...")
    key, raw = text.split("=", 1)
    key = key.strip()
    values = split_values(raw)
    for value in values:
        load_config(None, [f"{key}={value}"])  # a typo in the key or a wrong-typed value fails here
    if key in ("distill.method", "run.seed", "run.out_dir"):
        raise ConfigError(f"--sweep {key}: use --methods / --seeds / --out for that")
    return key, values


@dataclass
class Run:
    """One training run of the grid."""

    method: str
    seed: int
    point: Dict[str, str]  # the sweep values that apply to this method
    overrides: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = [self.method] + [f"{k}={v}" for k, v in self.point.items()]
        return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "__".join(parts))

    def relative_dir(self) -> Path:
        return Path("runs") / self.name / f"seed{self.seed}"


def sweep_points(sweeps: Sequence[Tuple[str, List[str]]]) -> List[Dict[str, str]]:
    """Every combination of the sweep values (one empty point without sweeps)."""
    keys = [key for key, _ in sweeps]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[values for _, values in sweeps])]


def applies(method: str, key: str) -> bool:
    """Whether a config key can change a run of ``method`` (the distill section does not change "none")."""
    return not (method == "none" and key.startswith("distill."))


def split_method_set(text: str) -> Tuple[Optional[str], str]:
    """``"facd:distill.lambda=0.03"`` -> ("facd", "distill.lambda=0.03"); a plain override -> (None, text)."""
    match = re.fullmatch(r"([a-z0-9-]+):(.+)", text)
    if match and match.group(1) in METHODS:
        return match.group(1), match.group(2)
    return None, text


def build_grid(methods: Sequence[str], seeds: Sequence[int], sweeps: Sequence[Tuple[str, List[str]]],
               sets: Sequence[str] = ()) -> List[Run]:
    """The runs, without duplicates (a "none" run serves every point differing only in distill keys).

    ``sets`` are overrides for every run, or for one method's runs when prefixed ``METHOD:``
    (``facd:distill.lambda=0.03``).
    """
    runs: Dict[Tuple, Run] = {}
    for point in sweep_points(sweeps):
        for method in methods:
            own = {k: v for k, v in point.items() if applies(method, k)}
            own_sets = [text for prefix, text in map(split_method_set, sets) if prefix in (None, method)]
            for seed in seeds:
                overrides = [*own_sets, *(f"{k}={v}" for k, v in own.items()), f"distill.method={method}", f"run.seed={seed}"]
                key = (method, seed, tuple(own.items()))
                runs.setdefault(key, Run(method, seed, own, overrides))
    return list(runs.values())


def point_label(point: Dict[str, str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "-"


# --- one run (the child process) ---------------------------------------------------------------------
def run_one(run_dir: Path) -> Dict[str, Any]:
    """Train (or resume) the run described by ``run_dir/spec.json``, evaluate its student, write result.json."""
    import torch

    from .. import models
    from .evaluate import evaluate, open_benchmark
    from .trainer import Trainer

    spec = json.loads((run_dir / SPEC_NAME).read_text())
    result_path = run_dir / RESULT_NAME
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    config = load_config(spec["config"], [*spec["overrides"], f"run.out_dir={run_dir}", "train.progress=false"])
    method = config["distill"]["method"]
    export = run_dir / method / f"{method}.pth"
    if "train" not in result or not export.is_file():
        resumed = (run_dir / method / "checkpoints" / "last.pt").is_file()
        cpu_started = time.process_time()
        summary = Trainer(config, mode="distill", resume=True).fit()
        result = {
            "method": method, "seed": config["run"]["seed"], "point": spec["point"], "overrides": spec["overrides"],
            "train": {
                "steps": summary["steps"], "train_s": summary["elapsed_s"],
                # CPU time of this process (training, validation, plots); a resumed run counts its last part only.
                "cpu_s": time.process_time() - cpu_started, "resumed": resumed,
                "val_psnr_y": summary["val_psnr_y"],
            },
            "evals": {},
        }
        _write_json(result_path, result)
    network = None
    for name, folder in spec["evals"].items():
        if name in result["evals"] and result["evals"][name]["dir"] == folder:
            continue
        if network is None:
            torch.set_num_threads(max(1, config["run"]["threads"]))
            network = models.model_from_checkpoint(export)
        evaluation = evaluate(network, open_benchmark(folder, config["model"]["scale"]), config["model"]["scale"])
        result["evals"][name] = {"dir": folder, **evaluation}
        _write_json(result_path, result)
    return result


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1, allow_nan=True))
    os.replace(temporary, path)


# --- the study (the parent process) ------------------------------------------------------------------
def _eval_dirs(eval_dirs: Sequence[str], config: Dict) -> Dict[str, str]:
    """{name: absolute folder}: ``NAME=DIR`` or ``DIR`` (named by its folder); default the config's validation folder."""
    from .data_folders import resolve_data_dirs

    _, val_dir = resolve_data_dirs(config)  # writes the built-in photos first, so --eval-dir may name them
    if not eval_dirs:
        if not val_dir:
            raise ConfigError("no --eval-dir and the config has no data.val_hr_dir to evaluate on")
        eval_dirs = [f"val={val_dir}"]
    named: Dict[str, str] = {}
    for text in eval_dirs:
        name, folder = text.split("=", 1) if "=" in text else (Path(text).name, text)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"--eval-dir {text!r}: the name {name!r} may hold letters, digits, '_', '.', '-' only")
        if name in named:
            raise ConfigError(f"--eval-dir: two evaluation sets named {name!r}; name them NAME=DIR")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--eval-dir: folder {folder!r} does not exist")
        named[name] = str(Path(folder).resolve())
    return named


def _sha256(path: str) -> Optional[str]:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else None


def _prepare(run: Run, out: Path, config_path: str, evals: Dict[str, str]) -> Path:
    """The run's folder with its spec.json; a folder holding a run of another config file content or
    other overrides is an error (the same file elsewhere, e.g. in another checkout, is the same run)."""
    run_dir = out / run.relative_dir()
    spec = {"config": config_path, "config_sha256": _sha256(config_path), "overrides": run.overrides,
            "point": run.point, "evals": evals}
    spec_path = run_dir / SPEC_NAME
    if spec_path.is_file():
        old = json.loads(spec_path.read_text())
        old_sha = old.get("config_sha256") or _sha256(old["config"])
        if old_sha != spec["config_sha256"] or old["overrides"] != spec["overrides"]:
            raise ConfigError(
                f"{run_dir} holds a run of another config ({old['config']} {old['overrides']}); "
                f"use another --out or the same config and --set values"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(spec_path, spec)
    return run_dir


def _done(run_dir: Path, evals: Dict[str, str]) -> bool:
    path = run_dir / RESULT_NAME
    if not path.is_file():
        return False
    result = json.loads(path.read_text())
    return all(name in result.get("evals", {}) and result["evals"][name]["dir"] == folder for name, folder in evals.items())


def _prepare_data(config_file: str, grid: Sequence[Run]) -> None:
    """Write the built-in photos and the LR cache of every training set of the grid once, here, before
    the children start: parallel runs would otherwise all write the same cache files at once."""
    from .. import data as sr_data
    from .data_folders import resolve_data_dirs

    done = set()
    for run in grid:
        config = load_config(config_file, run.overrides)
        data = config["data"]
        key = (data["train_hr_dir"], data["train_lr_dir"], data["cache_dir"], data["builtin_root"], config["model"]["scale"])
        if key in done:
            continue
        done.add(key)
        train_dir, _ = resolve_data_dirs(config)
        if data["train_lr_dir"] or not train_dir or not Path(train_dir).is_dir():
            continue  # nothing to cache (or the run itself reports the missing folder)
        sr_data.PairedFolderDataset(train_dir, config["model"]["scale"], data["patch_size"],
                                    cache_dir=data["cache_dir"] or None, augment=False)


def _launch(run_dir: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(run_dir / "log.txt", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "facd_fast.train.study", str(run_dir)], stdout=log, stderr=subprocess.STDOUT, env=env
    )


def run_study(
    config_path: str,
    *,
    methods: Sequence[str] = ("none", "fd-l1", "facd"),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    sweeps: Sequence[str] = (),
    sets: Sequence[str] = (),
    eval_dirs: Sequence[str] = (),
    jobs: int = 1,
    out: str | Path = "runs/study",
    baseline: str = "none",
    progress: bool = True,
    train: bool = True,
    echo=print,
) -> Dict[str, Any]:
    """Run (or finish) the grid, then write and return the study (``study.json``, ``study.md``, plots).

    ``train=False`` only summarises the runs already finished (while the study runs elsewhere, say).
    """
    from tqdm.auto import tqdm

    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--methods: unknown method {method!r}; methods are {list(METHODS)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ConfigError("--methods and --seeds must not repeat a value")
    if baseline not in methods:
        raise ConfigError(f"--baseline {baseline!r} is not one of --methods {list(methods)}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    for text in sets:
        prefix, override = split_method_set(text)
        if prefix is not None and prefix not in methods:
            raise ConfigError(f"--set {text!r}: method {prefix!r} is not one of --methods {list(methods)}")
        load_config(None, [override])  # a typo in the key or a wrong-typed value fails here
    parsed = [parse_sweep(text) for text in sweeps]
    config = load_config(config_path, [t for p, t in map(split_method_set, sets) if p is None])  # a bad file fails early
    out = Path(out)
    evals = _eval_dirs(eval_dirs, config)
    grid = build_grid(methods, seeds, parsed, sets)
    config_file = str(resources.config_path(config_path).resolve())  # a shipped config's name -> its file
    run_dirs = [_prepare(run, out, config_file, evals) if train else out / run.relative_dir()
                for run in grid]

    pending = [d for d in run_dirs if not _done(d, evals)] if train else []
    if pending:
        _prepare_data(config_file, grid)
    if train:
        echo(f"[study] {len(grid)} runs ({len(grid) - len(pending)} already done), {jobs} at a time, under {out}")
    else:
        echo(f"[study] summarising the finished runs among {len(grid)} under {out} (--no-train)")
    bar = tqdm(total=len(grid), initial=len(grid) - len(pending), desc="study", unit="run",
               disable=not (progress and pending))
    running: List[Tuple[Path, subprocess.Popen]] = []
    failed: List[Path] = []
    queue = list(pending)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run_dir = queue.pop(0)
                running.append((run_dir, _launch(run_dir, config["run"]["threads"])))
            time.sleep(0.5)
            for item in list(running):
                run_dir, process = item
                if process.poll() is None:
                    continue
                running.remove(item)
                bar.update(1)
                if process.returncode != 0 or not _done(run_dir, evals):
                    failed.append(run_dir)
                    tail = (run_dir / "log.txt").read_text().strip().splitlines()[-3:]
                    echo(f"[study] run {run_dir} failed (exit {process.returncode}): " + " | ".join(tail))
    finally:
        for _, process in running:  # interrupted: stop the children (they resume next time)
            process.terminate()
        bar.close()
    study = summarize_study(out, grid, methods, seeds, parsed, evals, baseline)
    write_study(out, study)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed, see their log.txt: " + ", ".join(map(str, failed)))
    return study


# --- summary -----------------------------------------------------------------------------------------
def summarize_study(out: Path, grid: Sequence[Run], methods, seeds, sweeps, evals: Dict[str, str], baseline: str) -> Dict[str, Any]:
    """The rows of the finished runs and, per evaluation set, per-group statistics and paired differences."""
    rows = []
    for run in grid:
        path = out / run.relative_dir() / RESULT_NAME
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for name in evals:
            if name not in result["evals"]:
                continue
            evaluation = result["evals"][name]
            diagnostics = _run_diagnostics(out / run.relative_dir() / run.method / "log.jsonl")
            rows.append({
                "eval": name, "method": run.method, "seed": run.seed, "point": run.point,
                "mean_psnr_y": evaluation["mean_psnr_y"], "mean_ssim_y": evaluation["mean_ssim_y"],
                "train_s": result["train"]["train_s"], "cpu_s": result["train"]["cpu_s"],
                "steps": result["train"]["steps"], "run_dir": str(run.relative_dir()), "diagnostics": diagnostics,
            })
    points = sweep_points(sweeps)
    sets = {}
    for name in evals:
        groups, comparisons = [], []
        for point in points:
            by_method: Dict[str, Dict[int, float]] = {}
            for method in methods:
                own = {k: v for k, v in point.items() if applies(method, k)}
                values = {r["seed"]: r["mean_psnr_y"] for r in rows if r["eval"] == name and r["method"] == method and r["point"] == own}
                ssim = [r["mean_ssim_y"] for r in rows if r["eval"] == name and r["method"] == method and r["point"] == own]
                if not values:
                    continue
                by_method[method] = values
                stats = summarize([values[s] for s in sorted(values)])
                logged = [r["diagnostics"] for r in rows if r["eval"] == name and r["method"] == method
                          and r["point"] == own and r["diagnostics"]]
                diagnostics = {key: sum(d[key] for d in logged) / len(logged) for key in logged[0]} if logged else {}
                groups.append({"method": method, "point": point, "own_point": own, "psnr_y": stats, "values": values,
                               "ssim_y_mean": sum(ssim) / len(ssim), "diagnostics": diagnostics,
                               "train_s_mean": sum(r["train_s"] for r in rows if r["eval"] == name and r["method"] == method
                                                   and r["point"] == own) / len(values)})
            others = [m for m in methods if m != baseline]
            pairs = [(m, baseline) for m in others] + list(itertools.combinations(others[::-1], 2))[::-1]
            for a, b in pairs:
                if a in by_method and b in by_method:
                    stats = paired_difference(by_method[a], by_method[b])
                    if stats is not None:
                        comparisons.append({"a": a, "b": b, "point": point, "psnr_y_diff": stats, "verdict": verdict(stats)})
        sets[name] = {"dir": evals[name], "groups": groups, "comparisons": comparisons}
    return {
        "methods": list(methods), "seeds": list(seeds), "sweeps": {k: v for k, v in sweeps}, "baseline": baseline,
        "runs": len(grid), "finished": len({r["run_dir"] for r in rows}), "rows": rows, "evals": sets,
    }


DIAGNOSTIC_KEYS = ("grad_pixel", "grad_output", "grad_feature", "cos_output_pixel", "cos_feature_pixel",
                   "distilled_fraction")


def _run_diagnostics(log_path: Path) -> Dict[str, float]:
    """Means over a run's logged steps of the gradient diagnostics (and feature/pixel ratio); {} if none logged."""
    from .run_log import read_log

    if not log_path.is_file():
        return {}
    records = [r for r in read_log(log_path, "train") if "grad_pixel" in r]
    if not records:
        return {}
    means = {key: sum(r[key] for r in records) / len(records) for key in DIAGNOSTIC_KEYS if key in records[0]}
    if "grad_feature" in means:
        means["feature_over_pixel"] = sum(r["grad_feature"] / max(r["grad_pixel"], 1e-12) for r in records) / len(records)
    return means


def diagnostics_table(study: Dict[str, Any], name: str) -> str:
    """Per group, the run-mean gradient diagnostics (empty when no run logged them)."""
    groups = [g for g in study["evals"][name]["groups"] if g.get("diagnostics")]
    if not groups:
        return ""
    lines = ["| method | sweep | grad pixel | grad output | grad feature | feature/pixel | cos(output, pixel) | "
             "cos(feature, pixel) | distilled fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        d = group["diagnostics"]
        cell = lambda key, f="{:.4f}": f.format(d[key]) if key in d else "-"  # noqa: E731
        lines.append(f"| {group['method']} | {point_label(group['point'])} | {cell('grad_pixel')} | {cell('grad_output')} | "
                     f"{cell('grad_feature')} | {cell('feature_over_pixel', '{:.3f}')} | {cell('cos_output_pixel', '{:.3f}')} | "
                     f"{cell('cos_feature_pixel', '{:.3f}')} | {cell('distilled_fraction', '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def _fmt(stats: Dict[str, float], digits: int = 3) -> str:
    if math.isnan(stats["ci_half"]):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci_half']:.{digits}f}"


def study_tables(study: Dict[str, Any]) -> str:
    """The study as Markdown tables (one pair of tables per evaluation set)."""
    lines = []
    for name, data in study["evals"].items():
        lines += [f"### {name} ({data['dir']})", "",
                  "| method | sweep | n | Y-PSNR mean ± 95% CI (dB) | std | SSIM |", "|---|---|---|---|---|---|"]
        listed = set()
        for group in data["groups"]:
            key = (group["method"], tuple(group.get("own_point", group["point"]).items()))
            if key in listed:  # a "none" run shared by several sweep points: one row
                continue
            listed.add(key)
            stats = group["psnr_y"]
            lines.append(f"| {group['method']} | {point_label(group.get('own_point', group['point']))} | {stats['n']} | {_fmt(stats)} | "
                         f"{stats['std']:.3f} | {group['ssim_y_mean']:.4f} |")
        lines += ["", "| paired difference | sweep | n | mean ± 95% CI (dB) | wins/losses | verdict |", "|---|---|---|---|---|---|"]
        for comparison in data["comparisons"]:
            stats = comparison["psnr_y_diff"]
            lines.append(f"| {comparison['a']} − {comparison['b']} | {point_label(comparison['point'])} | {stats['n']} | "
                         f"{_fmt(stats)} | {stats['wins']}/{stats['losses']} | {comparison['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def write_study(out: Path, study: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", study)
    header = (f"# Study: {study['finished']}/{study['runs']} runs, methods {', '.join(study['methods'])}, "
              f"seeds {', '.join(map(str, study['seeds']))}\n\nY-PSNR by the exact protocol (`facd eval`); "
              f"95% confidence intervals are t-based over seeds; paired differences are per seed.\n\n")
    diagnostics = ""
    first = next(iter(study["evals"]), None)
    if first is not None and diagnostics_table(study, first):
        diagnostics = ("\n### Gradient diagnostics (means over each run's logged steps, then over seeds)\n\n"
                       + diagnostics_table(study, first))
    (out / "study.md").write_text(header + study_tables(study) + diagnostics)
    if study["rows"]:
        for name in study["evals"]:
            plot_study(study, name, out / f"study_{name}.png")
        plot_diagnostics(study, out, out / "study_diagnostics.png")


def _diagnostic_logs(study: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """{group label: log.jsonl of its lowest seed's run} for the groups whose runs logged gradient norms."""
    logs: Dict[str, Path] = {}
    for row in sorted(study["rows"], key=lambda r: r["seed"]):
        label = row["method"] + ("" if not row["point"] else " " + point_label(row["point"]))
        path = out / row["run_dir"] / row["method"] / "log.jsonl"
        if label not in logs and path.is_file() and '"grad_pixel"' in path.read_text():
            logs[label] = path
    return logs


def plot_diagnostics(study: Dict[str, Any], out: Path, out_png: Path) -> Optional[Path]:
    """Gradient norm of each objective term into the student, its cosine with the pixel term's, and the
    distilled fraction, against steps (one seed per group); None when no run logged them."""
    from .plots import _pyplot
    from .run_log import read_log

    logs = _diagnostic_logs(study, out)
    if not logs:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    styles = {"pixel": "-", "output": "--", "feature": ":"}
    for index, (label, path) in enumerate(logs.items()):
        records = [r for r in read_log(path, "train") if "grad_pixel" in r]
        steps = [r["step"] for r in records]
        color = f"C{index % 10}"
        for term, style in styles.items():
            if f"grad_{term}" in records[0]:
                axes[0].plot(steps, [r[f"grad_{term}"] for r in records], style, color=color,
                             label=f"{label}: {term}", lw=1)
        if "grad_feature" in records[0]:
            ratio = [r["grad_feature"] / max(r["grad_pixel"], 1e-12) for r in records]
            axes[1].plot(steps, ratio, color=color, label=label, lw=1)
            axes[2].plot(steps, [r["cos_feature_pixel"] for r in records], color=color, label=label, lw=1)
        if "distilled_fraction" in records[0]:
            axes[3].plot(steps, [r["distilled_fraction"] for r in records], color=color, label=label, lw=1)
    axes[0].set(yscale="log", xlabel="step", title="gradient norm into the student, per term")
    axes[1].set(yscale="log", xlabel="step", title="feature term / pixel term (gradient norms)")
    axes[2].set(xlabel="step", title="cosine(feature gradient, pixel gradient)")
    axes[2].axhline(0.0, color="k", lw=0.6)
    axes[3].set(xlabel="step", title="distilled fraction (mask)", ylim=(-0.05, 1.05))
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def plot_study(study: Dict[str, Any], name: str, out_png: Path) -> Path:
    """Left: each seed's Y-PSNR per method and sweep point (paired seeds joined), mean and 95% CI.
    Right: the paired differences with their 95% CI, zero marked."""
    from .plots import _pyplot

    plt = _pyplot()
    data = study["evals"][name]
    groups, comparisons = data["groups"], data["comparisons"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.2 * (len(groups) + len(comparisons)) + 3), 4.5))
    labels = [g["method"] + ("" if not g["point"] else "\n" + point_label(g["point"])) for g in groups]
    seeds = sorted({s for g in groups for s in g["values"]})
    for seed in seeds:
        xs = [i for i, g in enumerate(groups) if seed in g["values"]]
        left.plot(xs, [groups[i]["values"][seed] for i in xs], color="0.8", lw=0.8, zorder=1)
    for i, group in enumerate(groups):
        values = [group["values"][s] for s in sorted(group["values"])]
        left.scatter([i] * len(values), values, s=14, color="C0", zorder=2)
        stats = group["psnr_y"]
        half = 0.0 if math.isnan(stats["ci_half"]) else stats["ci_half"]
        left.errorbar(i + 0.15, stats["mean"], yerr=half, fmt="s", color="C3", capsize=4, zorder=3)
    left.set_xticks(range(len(groups)), labels, fontsize=7)
    left.set_ylabel("Y-PSNR (dB)")
    left.set_title(f"{name}: seeds (grey: same seed), mean ± 95% CI", fontsize=9)
    for i, comparison in enumerate(comparisons):
        stats = comparison["psnr_y_diff"]
        half = 0.0 if math.isnan(stats["ci_half"]) else stats["ci_half"]
        right.errorbar(i, stats["mean"], yerr=half, fmt="o", color="C2", capsize=4)
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xticks(range(len(comparisons)), [f"{c['a']} − {c['b']}" + ("" if not c["point"] else "\n" + point_label(c["point"]))
                                                for c in comparisons], fontsize=7)
    right.set_ylabel("paired Y-PSNR difference (dB)")
    right.set_title("paired differences, mean ± 95% CI", fontsize=9)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child process: ``python -m facd_fast.train.study RUN_DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m facd_fast.train.study RUN_DIR (started by facd study)", file=sys.stderr)
        return 2
    run_one(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
