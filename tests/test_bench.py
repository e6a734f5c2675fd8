"""The kernel benchmark's machinery at a tiny shape: every provider, both distances, the floor, the load, the CSV."""
import csv

import pytest

from facd_fast.bench import kernels


def test_tiny_run_writes_every_provider_distance_and_the_floor(monkeypatch, tmp_path):
    monkeypatch.setitem(kernels.SHAPES, "tiny", (3, 8, 4, 5))
    providers = ["eager", "fused", "fitnet"]
    rows = kernels.run(shapes=["tiny"], dtypes=["float32"], providers=providers, out_dir=str(tmp_path),
                       device="cpu", min_reps=1, max_reps=1, budget_s=0.0)
    assert len(rows) == 2 * 2 * len(providers)  # modes x distances x providers
    written = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert {(r["mode"], r["distance"], r["provider"]) for r in written} == {
        (m, d, p) for m in kernels.MODES for d in kernels.DISTANCES for p in providers}
    assert all(float(r["p50"]) > 0 and float(r["floor"]) > 0 for r in written)
    assert all(r["kept_mem"] != "" for r in written if r["mode"] == "forward+backward")
    # the benchmark needs a quiet machine: each row says how loaded this one was, and on which CPU
    assert all(float(r["load_before"]) >= 0 and float(r["load_after"]) >= 0 and r["cpu_model"] for r in written)
    assert (tmp_path / "kernels-forward_backward.png").exists()


def test_rows_are_written_as_they_finish(monkeypatch, tmp_path):
    """A run stopped part-way (a killed process, a time limit) keeps every row it finished."""
    monkeypatch.setitem(kernels.SHAPES, "tiny", (3, 8, 4, 5))
    entry = kernels.benchmark_entry
    finished = []

    def entry_that_stops_at_the_third(*args, **kwargs):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(entry(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(kernels, "benchmark_entry", entry_that_stops_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        kernels.run(shapes=["tiny"], dtypes=["float32"], modes=["forward"], providers=["eager", "fused", "fitnet"],
                    out_dir=str(tmp_path), device="cpu", min_reps=1, max_reps=1, budget_s=0.0)
    written = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert [r["provider"] for r in written] == ["eager", "fused"]


def test_no_option_stops_other_processes():
    """The benchmark records the load; it never pauses the user's other work (issue 20)."""
    with pytest.raises(SystemExit) as stopped:
        kernels.main(["--pause", "anything"])
    assert stopped.value.code == 2  # argparse: no such option
