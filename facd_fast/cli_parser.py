"""The ``facd`` command's argument parser: every command, its arguments and their help (:mod:`facd_fast.cli`)."""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

from . import __version__
from .train.config import METHODS


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML config file, or the name of a shipped config (facd configs lists them)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=8 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/checkpoints/last.pt if it exists, with the settings it was "
                             "trained with (train.iterations, log/val/checkpoint periods, progress and threads may change)")
    parser.add_argument("--resume-with-changes", action="store_true",
                        help="resume, and let other settings (lr, schedule, loss weights, data, seed, precision; "
                             "not the networks) change from the next step; recorded in the log and config.toml")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run the stage folder holds (without it, or --resume, such a folder is an error)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``facd: error:`` line (exit 2) like every other error."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"facd: error: {command}{' '.join(message.split())} (facd {command.rstrip(': ')} --help)\n"
                  .replace("facd  --help", "facd --help"))


def build_parser() -> argparse.ArgumentParser:
    # Raw text: argparse would wrap the --version line (a long path) at the terminal's width.
    parser = _Parser(prog="facd", description="Feature-domain adaptive contrastive distillation for super-resolution.",
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
    evaluate.add_argument("--model", metavar="PRESET|MODULE:FUNCTION",
                          help="the architecture, when the file does not record it or its recorded factory moved: "
                               "a preset, or package.module:function called with scale= (and the recorded kwargs)")
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
    upscale.add_argument("--model", metavar="PRESET|MODULE:FUNCTION",
                         help="the architecture, when the file does not record it or its recorded factory moved: "
                              "a preset, or package.module:function called with scale= (and the recorded kwargs)")
    upscale.add_argument("--scale", type=int, help="with --model: the network's scale (default: read from the file)")
    upscale.add_argument("--ema", action="store_true", help="use a trainer checkpoint's EMA weights")
    upscale.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    upscale.add_argument("--batch", type=int, default=1,
                         help="images of one size per forward, or tiles per forward with --tile (default 1)")
    upscale.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    upscale.add_argument("--skip-existing", action="store_true",
                         help="keep output files that already exist and write the others (finish a stopped run)")
    upscale.add_argument("--skip-unreadable", action="store_true",
                         help="leave out inputs that do not decode (listed on stderr) instead of stopping")
    _add_inference_arguments(upscale)

    export = commands.add_parser("export", help="write the trained network (without DR) as BasicSR weights or ONNX")
    export.add_argument("checkpoint", help="trainer checkpoint (or any model file)")
    export.add_argument("out", help="output path (.pth for basicsr, .onnx for onnx)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--format", choices=("basicsr", "onnx"), default="basicsr",
                        help="basicsr: BasicSR-format weights; onnx: ONNX graph with dynamic batch, height and width, "
                             "checked against PyTorch by ONNX Runtime on a real photo (needs the deploy extra)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument("--model", metavar="PRESET|MODULE:FUNCTION",
                        help="the architecture, when the file does not record it or its recorded factory moved")
    export.add_argument("--scale", type=int, help="with --model: the network's scale (default: read from the file)")

    bench = commands.add_parser("bench", help="the kernel benchmark, then the training-step breakdown (facd_fast.bench)")
    bench.add_argument("--out", default="bench/results", help="results folder (CSV files and plots)")
    bench.add_argument("--setting", choices=("demo", "paper"), default=None,
                       help="training-step setting: demo (x2, CPU-sized) or paper (x4, HR 192, batch 16); "
                            "default: demo on CPU, paper on CUDA")
    bench.add_argument("--methods", default="none,fd-l1,facd", help="comma-separated methods (default none,fd-l1,facd)")
    bench.add_argument("--variant", action="append", default=None, metavar="NAME=SECTION.KEY=VALUE[;...]",
                       help="a named set of config overrides to time beside the others (repeatable; default: "
                            "default= and fp32=distill.teacher_precision=fp32;train.amp=off)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value in every training-step case (repeatable)")
    bench.add_argument("--steps", type=int, default=60, help="timed steps per case and round (default 60)")
    bench.add_argument("--rounds", type=int, default=4, help="rounds over the cases (default 4)")
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
