"""Benchmarks of facd_fast, one module each (results go to the top-level ``bench/results/``).

    kernels      the FACD loss of one tap: eager reference, torch.compile, fused kernels
                 (``python -m facd_fast.bench``, ``bench/kernels.py``, ``pytest bench/``); its cases,
                 timing and results in kernel_cases, kernel_timing and kernel_results
    train_step   steps/s of FACD distillation, fused loss vs reference loss (``facd bench``)
    latency      the demo teacher and students (and x4 presets) in eager, torch.compile and ONNX Runtime,
                 1 and 2 CPU threads, next to their Y-PSNR (``facd bench --latency``)

``facd bench`` runs the first two, ``facd bench --latency`` the third. A new
benchmark is a module here with a ``run(...)`` (rows, a CSV under the results
folder) and, if it has a command line, a ``main(argv)``; the top-level
``bench/`` folder keeps scripts, the pytest-benchmark suite and the results.
"""
