#!/usr/bin/env bash
# The GPU check in two device calls of at most 8 minutes each (bench/gpu_check.py says what each does):
#   bash bench/gpu_check.sh tests        # set-up, then the Triton tests on CUDA
#   bash bench/gpu_check.sh bench        # set-up if not left by the first, kernel benchmark, training step
#   bash bench/gpu_check.sh tests --dry  # the same steps on CPU tensors, no GPU (tests/test_gpu_check.py)
# Results go to $OUT (the device tool brings it back; --out DIR elsewhere): at most 8 files per call,
# each written as the part goes, the summary table printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
