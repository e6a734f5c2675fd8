"""Session setup shared by every test file."""
import os

import torch

# Triton decides when a kernel is decorated whether to compile it or to emulate it;
# without a GPU the Triton backend's tests run it in the interpreter on CPU tensors.
# This must happen before anything imports facd_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
