"""Kernel benchmark of the FACD loss (eager reference, torch.compile, fused): CSV and plots into bench/results/.

The implementation is facd_fast.bench.kernels (also ``python -m facd_fast.bench``); see its --help.
"""
import sys

from facd_fast.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
