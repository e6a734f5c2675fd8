"""The ``facd`` command (also ``python -m facd_fast``).

    facd train-teacher CONFIG [--set section.key=value ...] [--resume | --resume-with-changes | --overwrite]
    facd distill CONFIG --method {none,fd-l1,fd-l2,fakd,facd,facd-nomask} [--set ...] [--resume | --overwrite]
    facd eval CHECKPOINT --hr-dir DIR --scale S [--lr-dir DIR] [--model SPEC] [--self-ensemble] [--tile N] [--json]
              [--skip-unreadable]
    facd upscale CHECKPOINT INPUT... --out DIR [--tile N] [--tile-overlap M] [--self-ensemble] [--device D] [--batch N]
                 [--overwrite | --skip-existing] [--skip-unreadable]
    facd export CHECKPOINT OUT [--ema] [--format basicsr|onnx] [--overwrite] [--model SPEC] [--scale S]
    facd bench [--out DIR] [--setting demo|paper] [--methods M,..] [--variant NAME=K=V;..] [--steps N] [--rounds R]
               [--skip-kernels] [--device cpu|cuda] [--set ...]
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

import sys
from typing import List, Optional

from .cli_commands import (
    _run_bench, _run_configs, _run_demo, _run_eval, _run_export, _run_study, _run_training, _run_upscale,
)
from .cli_parser import build_parser

# ConfigError and the image and checkpoint errors are ValueErrors; OSError covers files
# that cannot be opened or written (missing, a folder, no permission, a full disk);
# ImportError an optional extra that is not installed.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


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
        print(f"facd: interrupted ({INTERRUPTED.get(args.command, 'files are written whole or not at all')})",
              file=sys.stderr)
        return 130
    except RuntimeError as error:
        from .train.trainer import TrainingDiverged

        if not isinstance(error, TrainingDiverged):
            raise
        _print_error(error)
        return 3


#: What an interrupted command leaves, and how to go on (every file is written whole or not at all).
INTERRUPTED = {
    "train-teacher": "files are written whole or not at all; --resume continues the run from its last checkpoint",
    "distill": "files are written whole or not at all; --resume continues the run from its last checkpoint",
    "study": "finished runs are kept; the same command resumes the others from their last checkpoints",
    "demo": "finished students are kept; `facd demo` with the same settings resumes the others",
    "upscale": "the images written so far are whole; --skip-existing finishes the folder without redoing them",
}


def _message(error: BaseException) -> str:
    """An error's message on one line; an OSError's without the "[Errno N]" prefix, naming its file."""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror
        if error.filename and str(error.filename) not in message:
            message = f"{error.filename}: {message}"
    else:
        message = str(error)
    return " ".join(message.split()) or type(error).__name__


def _print_error(error: BaseException) -> None:
    message = _message(error)
    print(f"facd: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
