"""The runner of a study: each run's folder and spec, the child processes that train and evaluate, resume.

Each run is an ordinary ``facd distill`` run of one config with its own
``run.out_dir`` (``OUT/runs/<method>[__key=value...]/seed<k>``), trained in
a child process (``python -m facd_fast.train.study RUN_DIR``, at most
``jobs`` at once) and resumed from its last checkpoint if a previous study
was interrupted. The child then evaluates the exported student by the exact
protocol (:func:`facd_fast.train.evaluate.evaluate`) on every evaluation
folder and writes ``RUN_DIR/result.json``, each evaluation with its key (the
folder's content, the student's file, the protocol:
:mod:`facd_fast.train.study.records`). A run whose evaluations are all current
is skipped; a trained one with a missing or stale evaluation (a photo added,
removed or edited, another student file, another protocol) only evaluates.
A run folder is bound to its resolved config: a study whose config or
``--set`` values resolve to other values there is refused, naming them.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ... import resources
from ..config import DEFAULTS, Config, ConfigError, load_config, validate_config
from ..data_folders import check_folder
from .grid import Run, build_grid, check_grid_arguments, parse_sweep, split_method_set
from .records import (RESULT_NAME, SPEC_NAME, config_differences, current_evaluations, evaluation_key, file_sha256,
                      folder_key, read_json, write_json)
from .report import summarize_study, write_study

#: The gradient diagnostics a run logs (facd_fast.train.diagnostics), averaged into its row.
DIAGNOSTIC_KEYS = ("grad_pixel", "grad_output", "grad_feature", "cos_output_pixel", "cos_feature_pixel",
                   "distilled_fraction")


# --- one run (the child process) ---------------------------------------------------------------------
def run_one(run_dir: Path) -> Dict[str, Any]:
    """Train (or resume) the run described by ``run_dir/spec.json``, evaluate its student, write result.json.

    Only the evaluations that are not current (:func:`facd_fast.train.study.records.current_evaluations`)
    are computed; each is recorded with its key.
    """
    import torch

    from ... import models
    from ..evaluate import evaluate, open_benchmark
    from ..trainer import Trainer

    spec = read_json(run_dir / SPEC_NAME)
    result_path = run_dir / RESULT_NAME
    result = read_json(result_path) if result_path.is_file() else {}
    config = run_config(spec["resolved"], run_dir)
    method = config["distill"]["method"]
    export = _export(run_dir, method)
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
        write_json(result_path, result)
    scale = config["model"]["scale"]
    current = current_evaluations(result, export, spec["evals"], scale)
    network = None
    for name, folder in spec["evals"].items():
        if name in current:
            continue
        if network is None:
            torch.set_num_threads(max(1, config["run"]["threads"]))
            network = models.model_from_checkpoint(export)
        # The folder's key is the parent's hash of it, taken once per study rather than once per run.
        evaluation = evaluate(network, open_benchmark(folder["dir"], scale), scale)
        result["evals"][name] = {"dir": folder["dir"], "key": evaluation_key(folder, export, scale), **evaluation}
        write_json(result_path, result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child process: ``python -m facd_fast.train.study RUN_DIR``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m facd_fast.train.study RUN_DIR (started by facd study)", file=sys.stderr)
        return 2
    try:
        run_one(Path(argv[0]))
    except ConfigError as error:  # one line in the run's log.txt, which the parent shows
        print(f"facd study: error: {error}", file=sys.stderr)
        return 2
    return 0


# --- the study (the parent process) ------------------------------------------------------------------
def _eval_sets(eval_dirs: Sequence[str], config: Config) -> Dict[str, Dict[str, Any]]:
    """{name: :func:`folder_key` of the folder}: ``NAME=DIR`` or ``DIR`` (named by its folder); default the
    config's validation folder. Each folder is hashed once, however many runs and names it serves."""
    from ..data_folders import resolve_data_dirs

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
        check_folder("--eval-dir", folder)
        named[name] = str(Path(folder).resolve())
    keys = {folder: folder_key(folder) for folder in set(named.values())}
    return {name: keys[folder] for name, folder in named.items()}


def recorded_config(spec: Mapping[str, Any], run_dir: Path, method: str) -> Mapping[str, Any]:
    """The resolved config a run folder's spec.json records.

    A spec.json written before specs held the resolved config records the config file, its SHA-256 and the
    overrides: resolved the same way while the file is unchanged, else read from the config the run trained
    with (``RUN_DIR/<method>/config.toml``); ConfigError when neither is there.
    """
    if "resolved" in spec:
        return spec["resolved"]
    try:
        if file_sha256(spec["config"]) == spec.get("config_sha256"):
            return load_config(spec["config"], spec["overrides"])
        trained = run_dir / method / "config.toml"
        if trained.is_file():
            return load_config(trained)
    except ConfigError as error:
        raise ConfigError(f"{run_dir / SPEC_NAME}: its recorded config no longer loads ({error}); "
                          f"use another --out") from None
    raise ConfigError(f"{run_dir / SPEC_NAME} names the config file {spec['config']}, which changed since (or is "
                      f"gone), and the run never trained, so nothing says which values it was made with; "
                      f"use another --out, or restore the file")


def prepare_runs(grid: Sequence[Run], configs: Sequence[Config], out: Path, config_file: str,
                 evals: Dict[str, Dict[str, Any]]) -> List[Path]:
    """Each run's folder with its spec.json; ``configs[i]`` is ``grid[i]``'s resolved config.

    A folder that holds a run of another resolved config (:func:`config_differences`) is refused, naming
    each key and its two values, before any spec is written; the same values from other override order
    or spelling, or from the same file elsewhere, are the same run. An existing spec keeps what it
    recorded (the config, the overrides, the resolved config, added to a spec written before specs held
    it); only its evaluation folders follow this call, and it is rewritten only when that changes it.
    """
    specs = []
    for run, config in zip(grid, configs):
        run_dir = out / run.relative_dir()
        spec_path = run_dir / SPEC_NAME
        if spec_path.is_file():
            old = read_json(spec_path)
            recorded = recorded_config(old, run_dir, run.method)
            differences = config_differences(recorded, config)
            if differences:
                raise ConfigError(f"{run_dir} holds a run of another config: {'; '.join(differences)}; use another "
                                  f"--out, or the config and --set values it was made with")
            spec = {**old, "resolved": recorded, "evals": evals}
        else:
            old = None
            spec = {"config": config_file, "overrides": run.overrides, "resolved": config, "point": run.point,
                    "evals": evals}
        specs.append((spec_path, old, spec))
    for spec_path, old, spec in specs:
        if old != spec:
            write_json(spec_path, spec)
    return [spec_path.parent for spec_path, _, _ in specs]


def run_config(resolved: Mapping[str, Mapping[str, Any]], run_dir: Path) -> Config:
    """The config a run trains with: the resolved config its spec records, in its own folder, without a
    progress bar. Keys the record lacks (added to the config since) take their defaults, as
    :func:`config_differences` assumes; the config file is not read again, so editing it cannot change a run."""
    config = copy.deepcopy(DEFAULTS)
    for section, values in resolved.items():
        config[section].update(values)
    config["run"]["out_dir"] = str(run_dir)
    config["train"]["progress"] = False
    validate_config(config)
    return config


def _export(run_dir: Path, method: str) -> Path:
    return run_dir / method / f"{method}.pth"


def _read_result(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / RESULT_NAME
    return read_json(path) if path.is_file() else {}


def _current(result: Mapping[str, Any], run_dir: Path, run: Run, config: Config,
             evals: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The run's evaluations that describe ``evals``, its student and the protocol (none before it trained)."""
    if "train" not in result:
        return {}
    return current_evaluations(result, _export(run_dir, run.method), evals, config["model"]["scale"])


def _prepare_data(configs: Sequence[Config]) -> None:
    """Write the built-in photos and the LR cache of every training set of the grid once, here, before
    the children start: parallel runs would otherwise all write the same cache files at once."""
    from ... import data as sr_data
    from ..data_folders import resolve_data_dirs

    done = set()
    for config in configs:
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


def _run_diagnostics(log_path: Path) -> Dict[str, float]:
    """Means over a run's logged steps of the gradient diagnostics (and feature/pixel ratio); {} if none logged."""
    from ..run_log import read_log

    if not log_path.is_file():
        return {}
    records = [r for r in read_log(log_path, "train") if "grad_pixel" in r]
    if not records:
        return {}
    means = {key: sum(r[key] for r in records) / len(records) for key in DIAGNOSTIC_KEYS if key in records[0]}
    if "grad_feature" in means:
        means["feature_over_pixel"] = sum(r["grad_feature"] / max(r["grad_pixel"], 1e-12) for r in records) / len(records)
    return means


def collect_rows(out: Path, grid: Sequence[Run], configs: Sequence[Config],
                 evals: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A row per run and evaluation set whose evaluation is current: Y-PSNR/SSIM, the keys it was made
    under, train time and logged diagnostics. Stale evaluations make no row."""
    rows = []
    for run, config in zip(grid, configs):
        run_dir = out / run.relative_dir()
        result = _read_result(run_dir)
        current = _current(result, run_dir, run, config, evals)
        if not current:
            continue
        diagnostics = _run_diagnostics(run_dir / run.method / "log.jsonl")
        for name in evals:
            if name not in current:
                continue
            evaluation = current[name]
            rows.append({
                "eval": name, "method": run.method, "seed": run.seed, "point": run.point,
                "mean_psnr_y": evaluation["mean_psnr_y"], "mean_ssim_y": evaluation["mean_ssim_y"],
                "folder_sha256": evaluation["key"]["folder_sha256"],
                "checkpoint_sha256": evaluation["key"]["checkpoint_sha256"],
                "train_s": result["train"]["train_s"], "cpu_s": result["train"]["cpu_s"],
                "steps": result["train"]["steps"], "run_dir": str(run.relative_dir()), "diagnostics": diagnostics,
            })
    return rows


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

    A run whose evaluations are all current is left alone; a trained run with a stale evaluation (its folder,
    student or the protocol changed) is evaluated again; any other is trained, resumed where it stopped.
    ``train=False`` only summarises the current evaluations (while the study runs elsewhere, say).
    """
    from tqdm.auto import tqdm

    check_grid_arguments(methods, seeds, baseline, sets)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    parsed = [parse_sweep(text) for text in sweeps]
    config = load_config(config_path, [t for p, t in map(split_method_set, sets) if p is None])  # a bad file fails early
    out = Path(out)
    evals = _eval_sets(eval_dirs, config)
    grid = build_grid(methods, seeds, parsed, sets)
    config_file = str(resources.config_path(config_path).resolve())  # a shipped config's name -> its file
    configs = [load_config(config_file, run.overrides) for run in grid]
    run_dirs = (prepare_runs(grid, configs, out, config_file, evals) if train
                else [out / run.relative_dir() for run in grid])

    def state(index: int) -> str:
        """ "done" (every evaluation current), "evaluate" (trained, an evaluation stale or missing) or "train"."""
        result = _read_result(run_dirs[index])
        if len(_current(result, run_dirs[index], grid[index], configs[index], evals)) == len(evals):
            return "done"
        return "evaluate" if "train" in result and _export(run_dirs[index], grid[index].method).is_file() else "train"

    states = [state(i) for i in range(len(grid))]
    pending = [i for i, s in enumerate(states) if s != "done"] if train else []
    _prepare_data([configs[i] for i in pending if states[i] == "train"])
    again = states.count("evaluate")
    if train:
        echo(f"[study] {len(grid)} runs ({states.count('done')} already done"
             f"{f', {again} to evaluate again' if again else ''}), {jobs} at a time, under {out}")
    else:
        echo(f"[study] summarising the finished runs among {len(grid)} under {out} (--no-train)"
             + (f"; {again} trained run(s) lack a current evaluation of some set (a new set, or its folder, the "
                f"student or the protocol changed): run without --no-train to evaluate them" if again else ""))
    bar = tqdm(total=len(grid), initial=len(grid) - len(pending), desc="study", unit="run",
               disable=not (progress and pending))
    running: List[Tuple[int, subprocess.Popen]] = []
    failed: List[Path] = []
    queue = list(pending)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                index = queue.pop(0)
                running.append((index, _launch(run_dirs[index], config["run"]["threads"])))
            time.sleep(0.5)
            for item in list(running):
                index, process = item
                if process.poll() is None:
                    continue
                running.remove(item)
                bar.update(1)
                if process.returncode != 0 or state(index) != "done":
                    failed.append(run_dirs[index])
                    tail = (run_dirs[index] / "log.txt").read_text().strip().splitlines()[-3:]
                    echo(f"[study] run {run_dirs[index]} failed (exit {process.returncode}): " + " | ".join(tail))
    finally:
        for _, process in running:  # interrupted: stop the children (they resume next time)
            process.terminate()
        bar.close()
    study = summarize_study(collect_rows(out, grid, configs, evals), len(grid), methods, seeds, parsed, evals, baseline)
    write_study(out, study)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed, see their log.txt: " + ", ".join(map(str, failed)))
    return study
