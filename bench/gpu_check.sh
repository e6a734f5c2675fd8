#!/usr/bin/env bash
# The GPU checks of the Triton kernels in one call, on a machine with a CUDA GPU (e.g. an H100):
#   1. the contract suite (tests/test_ops.py) and tests/test_triton_kernels.py on CUDA tensors at the
#      CUDA shapes, kernels compiled (no interpreter), opcheck and torch.compile on CUDA included,
#   2. the kernel benchmark on CUDA (bench/kernels.py: eager reference, torch.compile(reference),
#      triton via backend="auto"), results in bench/results/.
# Logs and results are also copied to $OUT when it is set (the device tool brings $OUT back).
#
#   bash bench/gpu_check.sh [arguments for bench/kernels.py]
#
# Needs a CUDA build of torch with triton, pytest, and this checkout installed (done here if not).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOGS=${OUT:-bench/results}
mkdir -p "$LOGS" bench/results
unset TRITON_INTERPRET  # compile the kernels for the GPU

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$LOGS/gpu.txt"
if ! "$PYTHON" -c "import facd_fast.kernels.contrastive" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi

status=0
"$PYTHON" -m pytest -q tests/test_ops.py tests/test_triton_kernels.py -k "cuda or triton" -p no:cacheprovider --durations=10 \
    2>&1 | tee "$LOGS/gpu_tests.log" || status=1
"$PYTHON" bench/kernels.py --device cuda "$@" 2>&1 | tee "$LOGS/gpu_bench.log" || status=1
if [ -n "${OUT:-}" ]; then
    cp -r bench/results "$OUT/bench_results"
fi
exit $status
