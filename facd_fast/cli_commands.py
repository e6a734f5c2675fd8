"""What each ``facd`` command does with its parsed arguments (the parser: :mod:`facd_fast.cli_parser`).

A handler returns the exit status; a user error is raised (:mod:`facd_fast.cli` prints it as one line).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List

from . import resources
from .train.config import METHODS, check_device, load_config


def _check_inference_arguments(args) -> None:
    for name in ("tile", "batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.tile_overlap is not None:
        if args.tile is None:
            raise ValueError("--tile-overlap needs --tile")
        if args.tile_overlap < 0:
            raise ValueError(f"--tile-overlap must be >= 0, got {args.tile_overlap}")


def _run_training(args, mode: str) -> int:
    from .train.trainer import Trainer

    overrides = list(args.overrides)
    if mode == "distill" and args.method:
        overrides.append(f"distill.method={args.method}")
    config = load_config(args.config, overrides)
    summary = Trainer(config, mode=mode, resume=args.resume, overwrite=args.overwrite,
                      resume_with_changes=args.resume_with_changes).fit()
    if summary.get("export"):
        print(f"wrote {summary['export']} ({summary['steps']} steps, {summary['elapsed_s']:.0f} s, "
              f"val Y-PSNR {summary['val_psnr_y']:.2f} dB)")
    return 0


def _run_eval(args) -> int:
    from .models import network_scale
    from .train.evaluate import evaluate, load_model, open_benchmark

    _check_inference_arguments(args)
    check_device("--device", args.device)
    network = load_model(args.checkpoint, preset=args.model, scale=args.scale, ema=args.ema)
    if network_scale(network) != args.scale:
        raise ValueError(f"--scale {args.scale} but {args.checkpoint} holds a x{network_scale(network)} model")
    folder = open_benchmark(args.hr_dir, args.scale, args.lr_dir, skip_unreadable=args.skip_unreadable)
    for skipped in folder.skipped:
        print(f"facd: warning: skipped unreadable image {skipped['file']}: {skipped['reason']}", file=sys.stderr)
    result = evaluate(network, folder, args.scale, device=args.device, progress=not args.json,
                      self_ensemble=args.self_ensemble, tile=args.tile, tile_overlap=args.tile_overlap)
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(len(image["name"]) for image in result["images"])
    for image in result["images"]:
        print(f"{image['name']:<{width}}  {image['psnr_y']:7.3f} dB  SSIM {image['ssim_y']:.4f}")
    print(f"{'mean':<{width}}  {result['mean_psnr_y']:7.3f} dB  SSIM {result['mean_ssim_y']:.4f}")
    return 0


def _run_upscale(args) -> int:
    from .deploy import upscale_files
    from .models import network_scale
    from .train.evaluate import load_model

    _check_inference_arguments(args)
    check_device("--device", args.device)
    network = load_model(args.checkpoint, preset=args.model, scale=args.scale, ema=args.ema)
    result = upscale_files(network, args.inputs, args.out, tile=args.tile, tile_overlap=args.tile_overlap,
                           ensemble=args.self_ensemble, device=args.device, batch=args.batch,
                           overwrite=args.overwrite, skip_existing=args.skip_existing,
                           skip_unreadable=args.skip_unreadable)
    for skipped in result["unreadable"]:
        print(f"facd: warning: skipped unreadable image {skipped['file']}: {skipped['reason']}", file=sys.stderr)
    kept = f", kept {len(result['kept'])} existing" if result["kept"] else ""
    unreadable = f", skipped {len(result['unreadable'])} unreadable" if result["unreadable"] else ""
    print(f"wrote {len(result['written'])} image(s) to {args.out} (x{network_scale(network)}){kept}{unreadable}")
    return 0


def _run_export(args) -> int:
    from .models import save_checkpoint_basicsr
    from .train.evaluate import load_model

    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise IsADirectoryError(f"export: {out} is a folder; give the path of the file to write, e.g. {out / 'model.pth'}")
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"export: {out} is the checkpoint being exported; give another output path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"export: {out} already exists; pass --overwrite to replace it")
    network = load_model(args.checkpoint, preset=args.model, scale=args.scale, ema=args.ema)
    if args.format == "basicsr":
        print(f"wrote {save_checkpoint_basicsr(network, out)}")
        return 0
    from .deploy.onnx_export import export_onnx

    report = export_onnx(network, out)
    checks = ", ".join(f"{'x'.join(map(str, c['shape'][2:]))}: {c['max_abs_diff']:.2e}" for c in report["checks"])
    print(f"wrote {report['path']} (ONNX opset {report['opset']}, dynamic N/H/W); ONNX Runtime vs PyTorch on a "
          f"real photo, max abs diff {checks} (tolerance {report['tolerance']:g})")
    return 0


def _check_out_folder(option: str, path: str) -> Path:
    """The folder ``path``, made now (so a bad --out fails before the work, not after it)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option} {path!r} is a file; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{option} {path!r}: cannot make the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{option} {path!r}: the folder is not writable")
    return folder


def _run_bench(args) -> int:
    from .bench import train_step

    if args.device is not None:
        check_device("--device", args.device)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown method(s) {unknown}; methods are {list(METHODS)}")
    variants = dict(train_step.parse_variant(text) for text in args.variant) if args.variant else None
    load_config(None, args.overrides)  # a bad --set fails before anything runs
    _check_out_folder("--out", args.out)
    if args.latency:
        from .bench import latency

        latency.run(out_dir=args.out, demo_dir=args.demo_dir)
        return 0
    if not args.skip_kernels:
        from .bench import kernels

        print("[bench] kernels (facd_fast.bench.kernels)", flush=True)
        kernels.run(out_dir=args.out, device=args.device)
    print("[bench] training step (facd_fast.bench.train_step)", flush=True)
    train_step.run(out_dir=args.out, setting=args.setting, methods=methods, variants=variants, steps=args.steps,
                   rounds=args.rounds, device=args.device, sets=args.overrides)
    return 0


def _run_demo(args) -> int:
    from .train.demo import run_demo

    from .train.demo import DEMO_SEEDS

    run_demo(out_dir=args.out, config_path=args.config, overrides=args.overrides,
             seeds=DEMO_SEEDS if args.seeds is None else args.seeds, jobs=args.jobs, overwrite=args.overwrite)
    return 0


def _run_configs(args) -> int:
    shipped = resources.shipped_configs()
    if args.name is not None:
        if args.name not in shipped:
            raise FileNotFoundError(f"no shipped config named {args.name!r}; shipped: {', '.join(shipped)}")
        print(shipped[args.name].read_text(), end="")
        return 0
    width = max(len(name) for name in shipped)
    for name, path in shipped.items():
        print(f"{name:<{width}}  {resources.config_summary(path)}")
    print(f"\n(in {next(iter(shipped.values())).parent}; use a name as CONFIG, e.g. facd distill edsr_x4 --method facd,"
          f" or copy one with facd configs NAME > my.toml)")
    return 0


def _run_study(args) -> int:
    from .train.study import run_study

    def integers(text: str) -> List[int]:
        try:
            return [int(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None

    try:
        run_study(
            args.config, methods=[m.strip() for m in args.methods.split(",")], seeds=integers(args.seeds),
            sweeps=args.sweep, sets=args.overrides, eval_dirs=args.eval_dir, jobs=args.jobs, out=args.out,
            baseline=args.baseline, train=not args.no_train,
        )
        status = 0
    except RuntimeError as error:  # some runs failed: the study of the others is written all the same
        print(f"facd: error: {error}", file=sys.stderr)
        status = 1
    print(f"wrote {args.out}/study.json, study.md, study_*.png")
    print((Path(args.out) / "study.md").read_text())
    return status
