"""``facd demo`` (``make demo``): FACD end to end on the built-in real photos, in minutes on a CPU.

1. writes the built-in photos (training and held-out folders);
2. takes the shipped x2 demo teacher (``package:checkpoints/edsr-demo-teacher-x2.pth``, made by
   ``scripts/make_demo_teacher.sh``), or trains a stand-in on the built-in photos when the file is absent;
3. distils students from it with one config, changing only the method and the seed
   (``facd study``): the student alone ("none"), FitNet-style FD ("fd-l1") and
   FACD ("facd"), ``DEMO_SEEDS`` seeds each, paired (same seed: same initial
   weights, same patches in the same order), two at a time;
4. evaluates them, bicubic and the teacher on the held-out photos by the exact
   protocol and prints mean ± 95% CI per method and the paired differences,
   saying in words which lie inside the noise;
5. writes to the run folder: ``teacher.pth`` and ``student_<method>.pth`` (seed 0,
   BasicSR format), ``results.json``, ``curves.png``, ``comparison.png`` and
   ``study/`` (every run, ``study.json``, ``study.md``, ``study_val.png``).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .. import models
from ..checks import check_int
from ..resources import resolve_path
from .config import Config, ConfigError, load_config
from .evaluate import evaluate, open_benchmark
from .plots import plot_comparison, plot_curves, super_resolve
from .data_folders import resolve_data_dirs
from .trainer import Trainer, run_files

#: Shipped configs (facd_fast/configs/), by name: see facd_fast.resources.config_path.
DEMO_CONFIG = "demo"
TEACHER_CONFIG = "demo-teacher"
#: The teacher's training record, kept beside the shipped checkpoint (facd_fast/checkpoints/README.md).
TEACHER_RECORD_SUFFIX = ".json"
DEMO_METHODS = ("none", "fd-l1", "facd")
#: Students per method: enough for a t-based confidence interval of each mean and paired difference.
DEMO_SEEDS = 4
#: Per-method settings over the demo config (facd_fast/configs/demo.toml): each method's lambda is the best of those tried on
#: the validation photos (docs/results.md); the file holds FACD's.
DEMO_METHOD_SETS = ("fd-l1:distill.lambda=0.01",)
#: The study behind the recipe (docs/results.md): 10 paired seeds, evaluated on the 12 held-out photos of
#: scripts/fetch_heldout.sh that no choice saw, and on the validation photos.
STUDY_COMMAND = ("scripts/fetch_heldout.sh && facd study demo --seeds 0,1,2,3,4,5,6,7,8,9 "
                 "--set fd-l1:distill.lambda=0.01 --eval-dir val=datasets/builtin/val "
                 "--eval-dir heldout=datasets/heldout-mate --jobs 2 --out runs/evidence")


def _prepare_teacher(config: Config, out_dir: Path, overrides: Iterable[str], overwrite: bool) -> Dict[str, object]:
    """The teacher checkpoint and its training time: the shipped one, or one trained now."""
    shipped = resolve_path(config["model"]["teacher_checkpoint"])
    if shipped.is_file():
        record_path = shipped.with_suffix(TEACHER_RECORD_SUFFIX)
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        print(f"[demo] teacher: shipped checkpoint {shipped} (trained {record.get('elapsed_s', float('nan')):.0f} s "
              f"with {record.get('command', 'facd train-teacher ' + TEACHER_CONFIG)})", flush=True)
        return {"path": shipped, "elapsed_s": record.get("elapsed_s"), "shipped": True}
    print(f"[demo] teacher: {shipped} not found; training a stand-in with {TEACHER_CONFIG} on the built-in "
          f"photos alone (the shipped one saw 88 more: scripts/make_demo_teacher.sh)", flush=True)
    teacher_config = load_config(TEACHER_CONFIG, [f"run.out_dir={out_dir}", "data.train_hr_dir=builtin", *overrides])
    summary = Trainer(teacher_config, mode="teacher", overwrite=overwrite).fit()
    return {"path": Path(summary["export"]), "elapsed_s": summary["elapsed_s"], "shipped": False}


def _group_table(groups: List[Dict], bicubic: float, teacher: Dict[str, float]) -> str:
    lines = [f"{'model':<22} {'seeds':>5} {'Y-PSNR mean ± 95% CI (dB)':>27} {'std':>6} {'SSIM':>7} {'vs bicubic':>11}",
             f"{'bicubic':<22} {'':>5} {bicubic:>27.3f} {'':>6} {'':>7} {'':>11}"]
    for group in groups:
        stats = group["psnr_y"]
        ci = f"{stats['mean']:.3f} ± {stats['ci_half']:.3f}"
        lines.append(f"{'student (' + group['method'] + ')':<22} {stats['n']:>5} {ci:>27} {stats['std']:>6.3f} "
                     f"{group['ssim_y_mean']:>7.4f} {stats['mean'] - bicubic:>+11.3f}")
    lines.append(f"{'teacher':<22} {'':>5} {teacher['psnr_y']:>27.3f} {'':>6} {teacher['ssim_y']:>7.4f} "
                 f"{teacher['psnr_y'] - bicubic:>+11.3f}")
    return "\n".join(lines)


def _difference_table(comparisons: List[Dict]) -> str:
    lines = [f"{'paired difference':<18} {'mean ± 95% CI (dB)':>20} {'wins/losses':>12}  verdict"]
    for comparison in comparisons:
        stats = comparison["psnr_y_diff"]
        ci = f"{stats['mean']:+.3f} ± {stats['ci_half']:.3f}"
        lines.append(f"{comparison['a'] + ' - ' + comparison['b']:<18} {ci:>20} "
                     f"{str(stats['wins']) + '/' + str(stats['losses']):>12}  {comparison['verdict']}")
    return "\n".join(lines)


def _claims(comparisons: List[Dict]) -> str:
    """The two claims the demo is about, in words, from the paired differences it printed."""
    diffs = {(c["a"], c["b"]): c["psnr_y_diff"] for c in comparisons}
    lines = ["What these photos support:"]
    gain = diffs.get(("facd", "none"))
    if gain is not None:
        low = gain["mean"] - gain["ci_half"]
        lines.append("  FACD beats the student alone: " + (
            f"yes, the 95% CI of FACD - none lies above 0 (lower bound {low:+.3f} dB)" if low > 0 else
            f"not shown by {gain['n']} seeds here (the 95% CI of FACD - none reaches {low:+.3f} dB)"))
    order = diffs.get(("facd", "fd-l1"))
    if order is not None:
        lines.append("  FACD >= FD: " + (
            f"yes, the mean paired difference is {order['mean']:+.3f} dB" if order["mean"] >= 0 else
            f"no, the mean paired difference is {order['mean']:+.3f} dB")
            + (" (CI contains 0: inside the noise)" if order["mean"] - order["ci_half"] <= 0 <= order["mean"]
               + order["ci_half"] else ""))
    lines.append("The study behind this recipe, 10 paired seeds on 12 held-out photos no choice saw, is "
                 "docs/results.md; it reruns with:\n  " + STUDY_COMMAND)
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", config_path: Optional[str] = None, overrides: Iterable[str] = (),
             seeds: int = DEMO_SEEDS, jobs: int = 2, overwrite: bool = False) -> Dict:
    """Run the demo; returns the results written to ``out_dir/results.json``.

    ``seeds`` students per method (seeds 0 .. seeds-1), ``jobs`` trained at once, through
    :func:`facd_fast.train.study.run_study`: a second call with the same ``out_dir`` and settings
    reuses the finished students (other settings there are an error); ``overwrite`` deletes
    ``out_dir/study`` first and trains them all again.
    """
    from .study import run_study

    if check_int("--seeds", seeds) < 2:
        raise ValueError(f"--seeds must be >= 2 (a confidence interval needs two seeds), got {seeds}")
    check_int("--jobs", jobs, 1)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    overrides = [f"run.out_dir={out_dir}", *overrides]
    config_path = str(config_path or DEMO_CONFIG)
    config = load_config(config_path, overrides)
    # An earlier demo of one student per method (before `facd study`) in out_dir: refuse, as any run does.
    earlier = [path for method in DEMO_METHODS for path in run_files(out_dir / method, method)]
    if earlier and not overwrite:
        raise FileExistsError(f"{out_dir} holds an earlier demo's runs ({', '.join(str(p) for p in earlier[:3])}, ...); "
                              f"pass --overwrite to replace them, or another --out")
    scale = config["model"]["scale"]
    print(f"[demo] writing the built-in photos under {config['data']['builtin_root']}", flush=True)
    _, val_dir = resolve_data_dirs(config)

    teacher = _prepare_teacher(config, out_dir, overrides, overwrite)
    if overwrite:
        for path in earlier:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if (out_dir / "study").exists():
            shutil.rmtree(out_dir / "study")
    teacher_network = models.model_from_checkpoint(teacher["path"], scale=scale)
    models.save_checkpoint_basicsr(teacher_network, out_dir / "teacher.pth")

    print(f"[demo] {len(DEMO_METHODS)} methods x {seeds} seeds = {len(DEMO_METHODS) * seeds} students "
          f"({config['train']['iterations']} steps each), {jobs} at a time", flush=True)
    sets = [*DEMO_METHOD_SETS, *overrides[1:], "train.plots=false",  # the demo draws its own plots below
            f"model.teacher_checkpoint={Path(teacher['path']).resolve()}",
            f"data.builtin_root={Path(config['data']['builtin_root']).resolve()}"]
    try:
        study = run_study(config_path, methods=DEMO_METHODS, seeds=list(range(seeds)), jobs=jobs,
                          out=out_dir / "study", sets=sets, eval_dirs=[f"val={val_dir}"])
    except ConfigError as error:
        if "holds a run of another config" not in str(error):
            raise
        raise ConfigError(f"{out_dir / 'study'} holds the students of a demo with other settings: pass --overwrite "
                          f"to train them again, or another --out ({error})") from None
    data = study["evals"]["val"]

    print(f"[demo] evaluating bicubic and the teacher on the validation photos in {val_dir}", flush=True)
    folder = open_benchmark(val_dir, scale)
    bicubic = evaluate(None, folder, scale)
    teacher_result = evaluate(teacher_network, folder, scale)
    students = {}
    for method in DEMO_METHODS:  # seed 0's students: exported beside the teacher, plotted
        run_dir = out_dir / "study" / "runs" / method / "seed0"
        students[method] = models.model_from_checkpoint(run_dir / method / f"{method}.pth")
        models.save_checkpoint_basicsr(students[method], out_dir / f"student_{method}.pth")
    _, lr, hr = folder[0]
    outputs = {f"student ({m})": super_resolve(network, lr) for m, network in students.items()}
    outputs["teacher"] = super_resolve(teacher_network, lr)
    plots = [
        plot_curves({m: out_dir / "study" / "runs" / m / "seed0" / m / "log.jsonl" for m in DEMO_METHODS},
                    out_dir / "curves.png"),
        plot_comparison(lr, hr, outputs, scale, out_dir / "comparison.png"),
        out_dir / "study" / "study_val.png",
    ]
    results = {
        "scale": scale,
        "val_dir": str(val_dir),
        "seeds": seeds,
        "student_steps": config["train"]["iterations"],
        "bicubic": {"psnr_y": bicubic["mean_psnr_y"], "ssim_y": bicubic["mean_ssim_y"]},
        "teacher": {"psnr_y": teacher_result["mean_psnr_y"], "ssim_y": teacher_result["mean_ssim_y"],
                    "shipped": teacher["shipped"], "train_s": teacher["elapsed_s"]},
        "groups": data["groups"],
        "comparisons": data["comparisons"],
        "wall_s": time.perf_counter() - started,
        "plots": [str(p) for p in plots],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"x{scale} on {len(folder)} validation photos (not trained on; the recipe was chosen on them; "
          f"held-out photos: docs/results.md) (Y channel, {scale}-pixel border cropped), "
          f"{seeds} students per method (seeds 0-{seeds - 1}), 95% CI t-based over seeds:")
    print(_group_table(data["groups"], results["bicubic"]["psnr_y"], results["teacher"]))
    print("\nPaired by seed (same initial weights, same patches in the same order):")
    print(_difference_table(data["comparisons"]))
    print()
    print(_claims(data["comparisons"]))
    print(f"\n[demo] done in {results['wall_s']:.0f} s; wrote {out_dir}/(teacher.pth, student_*.pth, results.json, "
          f"curves.png, comparison.png, study/)")
    return results
