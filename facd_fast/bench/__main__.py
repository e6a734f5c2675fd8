"""``python -m facd_fast.bench``: the kernel benchmark (see ``--help``; ``facd bench`` adds the training step)."""
import sys

from .kernels import main

if __name__ == "__main__":
    sys.exit(main())
