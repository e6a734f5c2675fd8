"""The frozen teacher in each precision: its forward's time and its Y-PSNR, side by side.

    python bench/teacher_precision.py [--teacher package:checkpoints/edsr-demo-teacher-x2.pth]
        [--heldout datasets/heldout-mate] [--out bench/results] [--reps 30]

Speed: the teacher's forward at the demo setting (batch 8, LR 16x16, one
thread), as :meth:`facd_fast.train.distiller.Distiller.teacher_forward` runs it,
in fp32, bf16 and fp16 autocast, with channels_last and contiguous inputs and
weights, under ``torch.no_grad`` and ``torch.inference_mode``; the variants
take turns call by call, so a change in load falls on all of them alike.
Quality: the teacher's Y-PSNR by the exact protocol (``facd eval``'s) in each
precision on the built-in validation photos and on the held-out photos
(``scripts/fetch_heldout.sh``), and the largest output difference from fp32.
Writes ``teacher_precision.csv``; needs a quiet machine (the load average is
in every row).
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facd_fast import data, models
from facd_fast.bench.train_step import cpu_name, load_average
from facd_fast.train.evaluate import evaluate
from facd_fast.train.precision import cpu_features, precision_context

PRECISIONS = ("fp32", "bf16", "fp16")


class InPrecision(nn.Module):
    """The network run under ``precision``'s autocast, its output back in float32 (what the loss receives)."""

    def __init__(self, network: nn.Module, precision: str) -> None:
        super().__init__()
        self.network, self.precision = network, precision
        self.scale = network.scale

    def forward(self, x):
        with precision_context(x.device, self.precision):
            return self.network(x).float()


def speed_rows(teacher: nn.Module, reps: int) -> list:
    torch.manual_seed(0)
    lr = torch.rand(8, 3, 16, 16)
    variants = list(itertools.product(PRECISIONS, ("channels_last", "contiguous"), ("no_grad", "inference_mode")))
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    networks = {layout: copy.deepcopy(teacher).to(memory_format=memory) for layout, memory in formats.items()}
    inputs = {"channels_last": lr.contiguous(memory_format=torch.channels_last), "contiguous": lr.contiguous()}
    modes = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}

    def call(variant):
        precision, layout, mode = variant
        with modes[mode](), precision_context(lr.device, precision):
            networks[layout](inputs[layout])

    for variant in variants:  # warm-up: oneDNN picks and caches its kernels per shape and dtype
        for _ in range(3):
            call(variant)
    times = {variant: [] for variant in variants}
    load_before = load_average()
    for _ in range(reps):
        for variant in variants:
            started = time.perf_counter()
            call(variant)
            times[variant].append((time.perf_counter() - started) * 1e3)
    load_after = load_average()
    rows = []
    for variant, values in times.items():
        p20, p50, p80 = np.percentile(values, [20, 50, 80])
        rows.append({"what": "forward_ms", "precision": variant[0], "layout": variant[1], "mode": variant[2],
                     "set": "batch 8 x 3 x 16 x 16", "value": round(float(p50), 3), "p20": round(float(p20), 3),
                     "p80": round(float(p80), 3), "load_before": load_before, "load_after": load_after})
    return rows


def quality_rows(teacher: nn.Module, folders: dict, scale: int) -> list:
    rows = []
    for name, folder in folders.items():
        bench = data.BenchmarkFolder(folder, scale)
        fp32 = None
        for precision in PRECISIONS:
            network = InPrecision(teacher, precision).eval()
            result = evaluate(network, bench, scale)
            outputs = []
            with torch.no_grad():
                for _, lr, _ in bench:
                    outputs.append(network(lr[None]))
            if precision == "fp32":
                fp32 = outputs
            worst = max(float((a - b).abs().max()) for a, b in zip(outputs, fp32))
            mean = float(np.mean([float((a - b).abs().mean()) for a, b in zip(outputs, fp32)]))
            rows.append({"what": "psnr_y", "precision": precision, "set": f"{name} ({len(bench)} photos)",
                         "value": round(result["mean_psnr_y"], 4), "max_abs_diff_vs_fp32": round(worst, 5),
                         "mean_abs_diff_vs_fp32": round(mean, 6),
                         "per_photo": " ".join(f"{i['name']}:{i['psnr_y']:.3f}" for i in result["images"])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="package:checkpoints/edsr-demo-teacher-x2.pth")
    parser.add_argument("--heldout", default="datasets/heldout-mate")
    parser.add_argument("--builtin-root", default="datasets/builtin")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from facd_fast.resources import resolve_path

    teacher = models.model_from_checkpoint(resolve_path(args.teacher)).eval().requires_grad_(False)
    _, val_dir = data.write_builtin_photos(args.builtin_root)
    folders = {"validation": val_dir}
    if Path(args.heldout).is_dir():
        folders["held-out"] = args.heldout
    rows = speed_rows(teacher, args.reps) + quality_rows(teacher, folders, teacher.scale)
    machine = {"cpu": cpu_name(), "bf16_features": " ".join(sorted(set(cpu_features()) & {"amx_bf16", "avx512_bf16",
                                                                                         "avx512_fp16", "amx_fp16"})),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    fields = ["what", "precision", "layout", "mode", "set", "value", "p20", "p80", "max_abs_diff_vs_fp32",
              "mean_abs_diff_vs_fp32", "load_before", "load_after", "per_photo", *machine]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "teacher_precision.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**row, **machine} for row in rows)
    print(f"{machine['cpu']} ({machine['bf16_features'] or 'no native bf16'}), torch {machine['torch']}, "
          f"{machine['threads']} thread")
    for row in rows:
        if row["what"] == "forward_ms":
            print(f"forward {row['precision']:<5} {row['layout']:<13} {row['mode']:<15} {row['value']:8.2f} ms "
                  f"(p20 {row['p20']:.2f}, p80 {row['p80']:.2f})")
        else:
            print(f"Y-PSNR  {row['precision']:<5} {row['set']:<26} {row['value']:8.3f} dB  max |diff| vs fp32 "
                  f"{row['max_abs_diff_vs_fp32']:.4f}")
    print(f"wrote {out / 'teacher_precision.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
