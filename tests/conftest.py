"""Session setup shared by every test file."""
import contextlib
import os

import pytest
import torch

# Triton decides when a kernel is decorated whether to compile it or to emulate it;
# without a GPU the Triton backend's tests run it in the interpreter on CPU tensors.
# This must happen before anything imports facd_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@contextlib.contextmanager
def _torch_state_kept():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# In-process trainers and benchmarks set torch's thread count and deterministic mode
# (run.threads, run.deterministic). The module-scoped copy is set up before a module's
# own module-scoped fixtures (which may train), the function-scoped one around each test.
@pytest.fixture(scope="module", autouse=True)
def restore_torch_state_after_module():
    with _torch_state_kept():
        yield


@pytest.fixture(autouse=True)
def restore_torch_state_after_test():
    with _torch_state_kept():
        yield
