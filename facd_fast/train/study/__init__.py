"""``facd study``: a grid of distillation runs (method x seed x sweep point), evaluated and compared in pairs.

Runs with the same seed start from the same student weights and see the same
patches in the same order whatever the method (the trainer seeds the DR
adapters and every crop apart from the global RNG), so methods are compared
seed by seed. ``OUT/study.json`` holds a row per run and evaluation set, per
method and sweep point n / mean / std / 95% CI, and paired differences against
the baseline method and between the other methods; ``study.md`` the same as
tables; ``study_<eval>.png`` the seeds, means and intervals.

Modules, each depending only on those before it:

    stats     mean, std, t-based confidence intervals, paired differences (no SciPy)
    grid      the runs: methods x seeds x sweep points, with each run's overrides
    records   the JSON files a study keeps (spec.json, result.json) and their keys: folder content,
              student file, protocol, resolved config
    report    statistics over the rows, study.json, study.md, plots
    runner    run folders and specs, child processes (``python -m facd_fast.train.study RUN_DIR``), resume, run_study
"""
from .grid import Run, build_grid, parse_sweep, split_values
from .report import study_tables, summarize_study, write_study
from .runner import run_study

__all__ = ["Run", "build_grid", "parse_sweep", "split_values", "run_study", "study_tables", "summarize_study",
           "write_study"]
