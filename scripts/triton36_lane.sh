#!/usr/bin/env bash
# The Triton tests with the GPU machines' Triton, 3.6.0, under its interpreter, on CPU.
#
#   scripts/triton36_lane.sh                  # every Triton test: pytest -m triton, in the files that hold them
#   scripts/triton36_lane.sh [PYTEST ARGS]    # a choice of them (make test-triton36 runs the default)
#
# `make test` runs the Triton kernels in the interpreter of the newest triton, which
# is not what a GPU machine runs: triton 3.9 keeps a Python float kernel argument in
# float64 where 3.6 rounds it to fp32 (issue 18: the norm floor). This lane builds a
# scratch virtual environment, .venv-triton36/ (git-ignored, kept between runs), with
# triton==3.6.0, numpy<2.4 (3.6's interpreter breaks on numpy >= 2.4) and the torch
# requirements/ci.txt pins (2.13.0, the CPU build; it works with triton 3.6.0), installs
# this checkout into it editable (one C++ build, about a minute, redone only when the
# build inputs change), then runs the tests with TRITON_INTERPRET=1. About 2 minutes
# after set-up on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-triton36
STAMP=$VENV/.facd-installed
TORCH_PIN=$(grep -E '^torch==' requirements/ci.txt)

if [ ! -f "$STAMP" ] || [ -n "$(find setup.py pyproject.toml requirements/ci.txt csrc -newer "$STAMP" -print -quit)" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
    "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" triton==3.6.0 "numpy<2.4" pytest hypothesis ninja
    # the editable build compiles facd_fast._C in place against the same pinned torch as .venv
    "$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
    touch "$STAMP"
fi
"$VENV/bin/python" -c "import numpy, torch, triton; \
print(f'triton-3.6 lane: triton {triton.__version__}, numpy {numpy.__version__}, torch {torch.__version__}')"
if [ $# -eq 0 ]; then
    # the files with Triton cases (the others need the train extra, which this environment leaves out)
    set -- -m triton tests/test_ops.py tests/test_triton_kernels.py tests/test_fuzz.py
fi
# triton 3.6's interpreter converts one-element arrays to scalars the way numpy 2.x deprecates (thousands of warnings)
TRITON_INTERPRET=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" "$@"
