"""pytest-benchmark suite of the FACD kernels, for regression tracking: ``pytest bench/``.

The same cases as ``python -m facd_fast.bench`` (imported from it, so the two
never drift); not collected by ``make test`` (pytest's testpaths is tests/).
Compare runs with ``pytest bench/ --benchmark-autosave`` and
``pytest-benchmark compare``.
"""
import pytest
import torch

from facd_fast import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = bench.cases()


@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_facd_loss(benchmark, case, provider):
    if provider == "eager" and bench.eager_too_large(case):
        pytest.skip(f"the eager reference would materialise more than {bench.EAGER_PAIR_BYTES_LIMIT >> 20} MB")
    student, teacher = bench.make_inputs(case, DEVICE)
    step = bench.step_function(bench.loss_function(provider), case, student, teacher)
    if DEVICE.type == "cuda":
        def synchronized_step():
            step()
            torch.cuda.synchronize(DEVICE)
    else:
        synchronized_step = step
    benchmark.extra_info.update(shape=case.shape, dtype=case.dtype_name, mode=case.mode,
                                versions=bench.versions(DEVICE))
    benchmark.pedantic(synchronized_step, warmup_rounds=1, rounds=5 if provider == "eager" else 10, iterations=1)
