"""pytest-benchmark suite of the FACD kernels, for regression tracking: ``pytest bench/``.

The same cases as ``python -m facd_fast.bench`` (facd_fast.bench.kernels, imported from it, so the two
never drift); not collected by ``make test`` (pytest's testpaths is tests/).
Compare runs with ``pytest bench/ --benchmark-autosave`` and
``pytest-benchmark compare``.
"""
import pytest
import torch

from facd_fast.bench import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = kernels.cases()


@pytest.mark.parametrize("provider", kernels.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_facd_loss(benchmark, case, provider):
    if provider == "eager" and kernels.eager_too_large(case):
        pytest.skip(f"the eager reference would materialise more than {kernels.EAGER_PAIR_BYTES_LIMIT >> 20} MB")
    student, teacher = kernels.make_inputs(case, DEVICE)
    step = kernels.step_function(kernels.loss_function(provider), case, student, teacher)
    if DEVICE.type == "cuda":
        def synchronized_step():
            step()
            torch.cuda.synchronize(DEVICE)
    else:
        synchronized_step = step
    benchmark.extra_info.update(shape=case.shape, dtype=case.dtype_name, mode=case.mode,
                                versions=kernels.versions(DEVICE))
    benchmark.pedantic(synchronized_step, warmup_rounds=1, rounds=5 if provider == "eager" else 10, iterations=1)
