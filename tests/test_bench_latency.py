"""The latency benchmark runs every provider and writes a CSV, a table and a plot (timings are not asserted)."""
import csv

import pytest
import torch

from facd_fast import models
from facd_fast.bench import latency
from facd_fast.cli import main



@pytest.mark.slow
def test_latency_benchmark_rows_csv_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(latency.INPUTS, 2, (12, 16))
    torch.manual_seed(0)
    tiny = models.build("edsr-demo-student", 2, num_block=1, num_feat=8).eval()
    timing = dict(threads=(1,), min_reps=2, max_reps=2, budget_s=0.0)
    rows = latency.benchmark_models([latency.LatencyModel("tiny student", tiny, "trained: tiny.pth", 30.5)], 2,
                                    tmp_path / "onnx", **timing)
    rows += latency.benchmark_models([latency.LatencyModel("tiny random", tiny, "random init", None)], 2,
                                     providers=("eager",), **timing)
    assert [(r["model"], r["provider"]) for r in rows] == [
        *(("tiny student", provider) for provider in latency.PROVIDERS), ("tiny random", "eager")]
    flops_by_hand = 2 * 12 * 16 * (3 * 8 * 9 + 2 * 8 * 8 * 9 + 8 * 8 * 9 + 8 * 32 * 9) + 2 * 24 * 32 * 8 * 3 * 9
    for row in rows:
        assert row["reps"] == 2 and row["threads"] == 1 and row["input"] == "16x12"
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["images_per_s"] == pytest.approx(1e3 / row["median_ms"], rel=2e-2)
        assert row["params"] == models.count_parameters(tiny)
        assert row["gflops"] == round(flops_by_hand / 1e9, 2)
    assert (tmp_path / "onnx" / "tiny_student-x2.onnx").is_file()
    latency.write_csv(rows, tmp_path / "latency.csv")
    assert len(list(csv.DictReader((tmp_path / "latency.csv").open()))) == len(rows)
    table = latency.markdown_table(rows).splitlines()
    assert len(table) == 4 and "| 30.500 |" in table[2] and "| - |" in table[3]
    assert latency.plot(rows, tmp_path / "latency.png").stat().st_size > 0


def test_count_flops_counts_two_per_multiply_add():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    assert latency.count_flops(conv, torch.rand(1, 3, 5, 7)) == 2 * 5 * 7 * 4 * 3 * 9


def test_bench_latency_flag_runs_the_latency_benchmark_only(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(latency, "run", lambda **kwargs: calls.append(kwargs))
    assert main(["bench", "--latency", "--out", str(tmp_path), "--demo-dir", str(tmp_path / "demo")]) == 0
    assert calls == [{"out_dir": str(tmp_path), "demo_dir": str(tmp_path / "demo")}]


def test_latency_benchmark_without_the_demo_students_names_the_missing_files(tmp_path, capsys):
    assert main(["bench", "--latency", "--out", str(tmp_path), "--demo-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "facd: error: latency benchmark:" in err and "student_none.pth" in err and "facd demo" in err
