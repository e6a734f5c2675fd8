"""``facd demo`` (``make demo``): FACD end to end on the built-in real photos, in minutes on a CPU.

1. writes the built-in photos (training and held-out folders);
2. takes the shipped x2 demo teacher (``package:checkpoints/edsr-demo-teacher-x2.pth``, made by
   ``facd train-teacher demo-teacher``), or trains it when the file is absent;
3. distils three students from it with one config, changing only the method:
   the student alone ("none"), FitNet-style FD ("fd-l1") and FACD ("facd");
4. evaluates bicubic, the students and the teacher on the held-out photos by the
   exact protocol and prints the table;
5. writes to the run folder: ``teacher.pth`` and ``student_<method>.pth`` (BasicSR
   format), ``results.json``, ``curves.png`` and ``comparison.png``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .. import models
from ..resources import resolve_path
from .config import Config, load_config
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


def _prepare_teacher(config: Config, out_dir: Path, overrides: Iterable[str], overwrite: bool) -> Dict[str, object]:
    """The teacher checkpoint and its training time: the shipped one, or one trained now."""
    shipped = resolve_path(config["model"]["teacher_checkpoint"])
    if shipped.is_file():
        record_path = shipped.with_suffix(TEACHER_RECORD_SUFFIX)
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        print(f"[demo] teacher: shipped checkpoint {shipped} (trained {record.get('elapsed_s', float('nan')):.0f} s "
              f"with {record.get('command', 'facd train-teacher ' + TEACHER_CONFIG)})", flush=True)
        return {"path": shipped, "elapsed_s": record.get("elapsed_s"), "shipped": True}
    print(f"[demo] teacher: {shipped} not found, training it with {TEACHER_CONFIG}", flush=True)
    teacher_config = load_config(TEACHER_CONFIG, [f"run.out_dir={out_dir}", *overrides])
    summary = Trainer(teacher_config, mode="teacher", overwrite=overwrite).fit()
    return {"path": Path(summary["export"]), "elapsed_s": summary["elapsed_s"], "shipped": False}


def _table(rows: List[Dict[str, object]]) -> str:
    lines = [f"{'model':<22} {'params':>9} {'Y-PSNR (dB)':>12} {'SSIM':>7} {'vs bicubic':>11} {'train time':>11}"]
    bicubic = rows[0]["psnr_y"]
    for row in rows:
        params = f"{row['params'] / 1e3:.0f}k" if row["params"] else "-"
        time_s = "-" if row["train_s"] is None else f"{row['train_s']:.0f} s"
        gain = "" if row["name"] == "bicubic" else f"{row['psnr_y'] - bicubic:+.3f}"
        lines.append(f"{row['name']:<22} {params:>9} {row['psnr_y']:>12.3f} {row['ssim_y']:>7.4f} {gain:>11} {time_s:>11}")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", config_path: Optional[str] = None, overrides: Iterable[str] = (),
             overwrite: bool = False) -> Dict:
    """Run the demo; returns the results written to ``out_dir/results.json``.

    An ``out_dir`` holding an earlier demo's runs is an error unless ``overwrite``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    overrides = [f"run.out_dir={out_dir}", *overrides]
    config = load_config(config_path or DEMO_CONFIG, overrides)
    earlier = [path for method in DEMO_METHODS for path in run_files(out_dir / method, method)]
    if earlier and not overwrite:
        raise FileExistsError(f"{out_dir} holds an earlier demo's runs ({', '.join(str(p) for p in earlier[:3])}, ...); "
                              f"pass --overwrite to replace them, or another --out")
    scale = config["model"]["scale"]
    print(f"[demo] writing the built-in photos under {config['data']['builtin_root']}", flush=True)
    _, val_dir = resolve_data_dirs(config)

    teacher = _prepare_teacher(config, out_dir, overrides, overwrite)
    config["model"]["teacher_checkpoint"] = str(teacher["path"])
    teacher_network = models.model_from_checkpoint(teacher["path"], scale=scale)
    models.save_checkpoint_basicsr(teacher_network, out_dir / "teacher.pth")

    students = {}
    for index, method in enumerate(DEMO_METHODS, 1):
        print(f"[demo] student {index}/{len(DEMO_METHODS)}: {method}", flush=True)
        student_config = copy.deepcopy(config)
        student_config["distill"]["method"] = method
        summary = Trainer(student_config, mode="distill", overwrite=overwrite).fit()
        network = models.model_from_checkpoint(summary["export"])
        models.save_checkpoint_basicsr(network, out_dir / f"student_{method}.pth")
        students[method] = {"network": network, "summary": summary}

    print(f"[demo] evaluating on the held-out photos in {val_dir}", flush=True)
    folder = open_benchmark(val_dir, scale)
    candidates = [("bicubic", None, None)]
    candidates += [(f"student ({method})", s["network"], s["summary"]["elapsed_s"]) for method, s in students.items()]
    candidates.append(("teacher", teacher_network, teacher["elapsed_s"]))
    rows = []
    for name, network, train_s in candidates:
        result = evaluate(network, folder, scale, progress=True, label=name)
        rows.append({
            "name": name, "psnr_y": result["mean_psnr_y"], "ssim_y": result["mean_ssim_y"], "train_s": train_s,
            "params": models.count_parameters(network) if network is not None else 0, "images": result["images"],
        })

    _, lr, hr = folder[0]
    outputs = {f"student ({m})": super_resolve(s["network"], lr) for m, s in students.items()}
    outputs["teacher"] = super_resolve(teacher_network, lr)
    plots = [
        plot_curves({method: out_dir / method / "log.jsonl" for method in students}, out_dir / "curves.png"),
        plot_comparison(lr, hr, outputs, scale, out_dir / "comparison.png"),
    ]
    results = {
        "scale": scale,
        "val_dir": str(val_dir),
        "rows": rows,
        "teacher_shipped": teacher["shipped"],
        "student_steps": config["train"]["iterations"],
        "wall_s": time.perf_counter() - started,
        "plots": [str(p) for p in plots],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"x{scale} on {len(folder)} held-out photos (Y channel, {scale}-pixel border cropped):")
    print(_table(rows))
    print(f"\n[demo] done in {results['wall_s']:.0f} s; wrote {out_dir}/(teacher.pth, student_*.pth, results.json, curves.png, comparison.png)")
    return results
