"""The ``facd`` command (also ``python -m facd_fast``).

    facd train-teacher CONFIG [--set section.key=value ...] [--resume | --overwrite]
    facd distill CONFIG --method {none,fd-l1,fd-l2,fakd,facd,facd-nomask} [--set ...] [--resume | --overwrite]
    facd eval CHECKPOINT --hr-dir DIR --scale S [--lr-dir DIR] [--model PRESET] [--self-ensemble] [--tile N] [--json]
              [--skip-unreadable]
    facd upscale CHECKPOINT INPUT... --out DIR [--tile N] [--tile-overlap M] [--self-ensemble] [--device D] [--batch N]
    facd export CHECKPOINT OUT [--ema] [--format basicsr|onnx] [--overwrite]
    facd bench [--out DIR] [--shapes small|paper|all] [--steps N] [--skip-kernels] [--device cpu|cuda]
    facd bench --latency [--out DIR] [--demo-dir DIR]
    facd demo [--out DIR] [--config CONFIG] [--set ...] [--overwrite]
    facd configs [NAME]
    facd study CONFIG [--methods none,fd-l1,facd] [--seeds 0,1,2,3,4] [--sweep KEY=V1,V2 ...] [--set ...]
               [--eval-dir [NAME=]DIR ...] [--jobs N] [--baseline none] --out DIR
    facd --version

CONFIG is a TOML file or the name of a shipped config (``facd distill edsr_x4``);
``facd configs`` lists the shipped ones and ``facd configs NAME`` prints one.

Errors in what the user gave (a missing, unreadable or non-finite file, an
unknown key or a bad value in the config, weights that do not fit the
architecture) print one ``facd: error: ...`` line naming the file, key or
value and exit with status 2. A run that diverges (``train.max_bad_steps``
non-finite steps in a row) prints one such line naming the step and the term
and exits with status 3.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__, resources
from .train.config import METHODS, check_device, load_config

# ConfigError and the image and checkpoint errors are ValueErrors; OSError covers files
# that cannot be opened or written (missing, a folder, no permission, a full disk);
# ImportError an optional extra that is not installed.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config file, or the name of a shipped config (facd configs lists them)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=8 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoints/last.pt if it exists")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run the stage folder holds (without it, or --resume, such a folder is an error)")


def build_parser() -> argparse.ArgumentParser:
    # Raw text: argparse would wrap the --version line (a long path) at the terminal's width.
    parser = argparse.ArgumentParser(prog="facd", description="Feature-domain adaptive contrastive distillation for super-resolution.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = commands.add_parser("train-teacher", help="train the teacher network (model.teacher) on L1 to HR")
    _add_config_arguments(teacher)

    distill = commands.add_parser("distill", help="distil a student (model.student) from a frozen teacher")
    _add_config_arguments(distill)
    distill.add_argument("--method", choices=METHODS, help="overrides distill.method of the config")

    evaluate = commands.add_parser("eval", help="Y-PSNR/SSIM of a checkpoint on a benchmark folder")
    evaluate.add_argument("checkpoint", help="exported model, trainer checkpoint or foreign BasicSR/EDSR/RCAN file")
    evaluate.add_argument("--hr-dir", required=True, help="HR images (plain folder or Set5-style root)")
    evaluate.add_argument("--lr-dir", help="LR images; default: made from HR with MATLAB-compatible bicubic")
    evaluate.add_argument("--scale", required=True, type=int)
    evaluate.add_argument("--model", metavar="PRESET", help="architecture preset, when the file does not record it")
    evaluate.add_argument("--ema", action="store_true", help="evaluate a trainer checkpoint's EMA weights")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.add_argument("--skip-unreadable", action="store_true",
                          help="leave out images that do not decode (listed on stderr and under \"skipped\" "
                               "in the JSON) instead of stopping")
    _add_inference_arguments(evaluate)

    upscale = commands.add_parser("upscale", help="super-resolve image files and folders into PNGs (names kept)")
    upscale.add_argument("checkpoint", help="exported model, trainer checkpoint or foreign BasicSR/EDSR/RCAN file")
    upscale.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    upscale.add_argument("--out", required=True, help="output folder (INPUT's name with .png)")
    upscale.add_argument("--model", metavar="PRESET", help="architecture preset, when the file does not record it")
    upscale.add_argument("--scale", type=int, help="with --model: the preset's scale (default: read from the weights)")
    upscale.add_argument("--ema", action="store_true", help="use a trainer checkpoint's EMA weights")
    upscale.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    upscale.add_argument("--batch", type=int, default=1,
                         help="images of one size per forward, or tiles per forward with --tile (default 1)")
    upscale.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    _add_inference_arguments(upscale)

    export = commands.add_parser("export", help="write the trained network (without DR) as BasicSR weights or ONNX")
    export.add_argument("checkpoint", help="trainer checkpoint (or any model file)")
    export.add_argument("out", help="output path (.pth for basicsr, .onnx for onnx)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--format", choices=("basicsr", "onnx"), default="basicsr",
                        help="basicsr: BasicSR-format weights; onnx: ONNX graph with dynamic batch, height and width, "
                             "checked against PyTorch by ONNX Runtime on a real photo (needs the deploy extra)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    bench = commands.add_parser("bench", help="the kernel and training-step benchmarks (facd_fast.bench)")
    bench.add_argument("--out", default="bench/results", help="results folder (CSV files)")
    bench.add_argument("--shapes", choices=("small", "paper", "all"), default=None,
                       help="training-step shapes; default: small on CPU, all on CUDA")
    bench.add_argument("--steps", type=int, default=None, help="timed steps per case (default 3 on CPU, 20 on CUDA)")
    bench.add_argument("--skip-kernels", action="store_true", help="run the training-step benchmark only")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    bench.add_argument("--latency", action="store_true",
                       help="run the latency benchmark instead (facd_fast.bench.latency: the demo teacher and "
                            "students, eager / torch.compile / ONNX Runtime, 1 and 2 CPU threads, with Y-PSNR)")
    bench.add_argument("--demo-dir", default="runs/demo", help="with --latency: where `facd demo` wrote the students")

    demo = commands.add_parser("demo", help="teacher, three students, table and plots on the built-in photos")
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--config", default=None, help="demo config file or shipped config name (default: demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    demo.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo in --out")
    demo.add_argument("--seeds", type=int, default=None, help="students per method (default 4)")
    demo.add_argument("--jobs", type=int, default=2, help="students trained at once (default 2)")

    configs = commands.add_parser("configs", help="list the shipped configs, or print one (to copy and edit)")
    configs.add_argument("name", nargs="?", help="print this shipped config's TOML text")

    study = commands.add_parser("study", help="grid of distill runs (method x seed x sweep), evaluated, compared in pairs")
    study.add_argument("config", help="TOML config file, or the name of a shipped config (facd configs lists them)")
    study.add_argument("--methods", default="none,fd-l1,facd", help="comma-separated methods (default none,fd-l1,facd)")
    study.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run.seed values (default 0,1,2,3,4)")
    study.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                       help="values of one config key to cross with the grid (repeatable: the product)")
    study.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value in every run, or in one method's runs with a METHOD: "
                            "prefix (facd:distill.lambda=0.03) (repeatable)")
    study.add_argument("--eval-dir", action="append", default=[], metavar="[NAME=]DIR",
                       help="evaluate every student on this folder (repeatable; default: the config's data.val_hr_dir)")
    study.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    study.add_argument("--baseline", default="none", help="method the others are compared with (default none)")
    study.add_argument("--out", required=True, help="study folder (an interrupted study resumes there)")
    study.add_argument("--no-train", action="store_true",
                       help="only summarise the runs of the grid already finished (train and evaluate nothing)")
    return parser


def _version_line() -> str:
    import torch

    package = Path(__file__).resolve().parent
    return f"facd {__version__} from {package} (torch {torch.__version__}, python {platform.python_version()})"


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--self-ensemble", action="store_true",
                        help="average the outputs of the 8 flips/rotations (x8 forwards), as EDSR/CSD/DUKD report")
    parser.add_argument("--tile", type=int, metavar="N",
                        help="run N x N LR tiles instead of the whole image (bounded memory)")
    parser.add_argument("--tile-overlap", type=int, metavar="M",
                        help="LR pixels of context around each tile (default: the network's receptive radius, "
                             "with which tiled equals whole-image output for EDSR)")


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
    summary = Trainer(config, mode=mode, resume=args.resume, overwrite=args.overwrite).fit()
    if summary.get("export"):
        print(f"wrote {summary['export']} ({summary['steps']} steps, {summary['elapsed_s']:.0f} s, "
              f"val Y-PSNR {summary['val_psnr_y']:.2f} dB)")
    return 0


def _run_eval(args) -> int:
    from .train.evaluate import evaluate, load_model, open_benchmark

    _check_inference_arguments(args)
    check_device("--device", args.device)
    network = load_model(args.checkpoint, preset=args.model, scale=args.scale, ema=args.ema)
    if network.scale != args.scale:
        raise ValueError(f"--scale {args.scale} but {args.checkpoint} holds a x{network.scale} model")
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
    from .train.evaluate import load_model

    _check_inference_arguments(args)
    check_device("--device", args.device)
    network = load_model(args.checkpoint, preset=args.model, scale=args.scale, ema=args.ema)
    written = upscale_files(network, args.inputs, args.out, tile=args.tile, tile_overlap=args.tile_overlap,
                            ensemble=args.self_ensemble, device=args.device, batch=args.batch,
                            overwrite=args.overwrite)
    print(f"wrote {len(written)} image(s) to {args.out} (x{network.scale})")
    return 0


def _run_export(args) -> int:
    from .models import save_checkpoint_basicsr
    from .train.evaluate import load_model

    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"export: {out} is a folder; give the path of the file to write, e.g. {out / 'model.pth'}")
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"export: {out} is the checkpoint being exported; give another output path")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"export: {out} already exists; pass --overwrite to replace it")
    network = load_model(args.checkpoint, ema=args.ema)
    if args.format == "basicsr":
        print(f"wrote {save_checkpoint_basicsr(network, out)}")
        return 0
    from .deploy.onnx_export import export_onnx

    report = export_onnx(network, out)
    checks = ", ".join(f"{'x'.join(map(str, c['shape'][2:]))}: {c['max_abs_diff']:.2e}" for c in report["checks"])
    print(f"wrote {report['path']} (ONNX opset {report['opset']}, dynamic N/H/W); ONNX Runtime vs PyTorch on a "
          f"real photo, max abs diff {checks} (tolerance {report['tolerance']:g})")
    return 0


def _run_bench(args) -> int:
    from .bench.train_step import run_step_benchmark

    if args.latency:
        from .bench import latency

        latency.run(out_dir=args.out, demo_dir=args.demo_dir)
        return 0
    if not args.skip_kernels:
        from .bench import kernels

        print("[bench] kernels (facd_fast.bench.kernels)", flush=True)
        kernels.run(out_dir=args.out, device=args.device)
    print("[bench] training step", flush=True)
    run_step_benchmark(out_dir=args.out, shapes=args.shapes, steps=args.steps, device=args.device)
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "train-teacher": lambda: _run_training(args, "teacher"),
        "distill": lambda: _run_training(args, "distill"),
        "eval": lambda: _run_eval(args),
        "upscale": lambda: _run_upscale(args),
        "export": lambda: _run_export(args),
        "bench": lambda: _run_bench(args),
        "demo": lambda: _run_demo(args),
        "configs": lambda: _run_configs(args),
        "study": lambda: _run_study(args),
    }
    try:
        return handlers[args.command]()
    except USER_ERRORS as error:
        _print_error(error)
        return 2
    except KeyboardInterrupt:
        print("facd: interrupted (files are written whole or not at all; --resume continues a run from its "
              "last checkpoint)", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from .train.trainer import TrainingDiverged

        if not isinstance(error, TrainingDiverged):
            raise
        _print_error(error)
        return 3


def _print_error(error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message held
    print(f"facd: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
