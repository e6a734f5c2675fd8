"""The child process of ``facd study``: ``python -m facd_fast.train.study RUN_DIR`` trains and evaluates one run."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
