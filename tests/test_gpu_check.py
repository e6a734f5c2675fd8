"""bench/gpu_check.sh, the device script: its dry run (every step on CPU tensors), and the verdicts that make a
device run fail rather than pass: a prerequisite missing, a Triton case skipped, no report at all."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)


def run_dry(part, out):
    result = subprocess.run(["bash", "bench/gpu_check.sh", part, "--dry", "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)
    return result, (out / f"{part}-summary.txt").read_text()


@pytest.mark.slow
def test_dry_tests_part_writes_its_files_and_passes(tmp_path):
    result, summary = run_dry("tests", tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tests-junit.xml", "tests-summary.txt", "tests.log"]
    counts = gpu_check.junit_counts(tmp_path / "tests-junit.xml")
    assert counts["tests"] > 0 and counts["skipped"] == counts["failures"] == counts["errors"] == 0
    assert summary.splitlines()[-1].split() == ["verdict", "PASS"]
    # the summary is printed last, after everything else the run printed
    assert result.stdout.rstrip().endswith(summary.rstrip())


@pytest.mark.slow
def test_dry_bench_part_writes_every_row_and_the_training_step(tmp_path):
    result, summary = run_dry("bench", tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-summary.txt", "bench.log", "kernels.csv",
                                                         "train_step.csv", "train_step.png"]
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert len(rows) == gpu_check.KERNEL_ENTRIES
    assert {(r["shape"], r["distance"], r["dtype"], r["provider"]) for r in rows} == {
        (shape, distance, dtype, provider) for shape in ("3x16x4x5", "3x8x4x5") for distance in ("l1", "l2")
        for dtype in ("float32", "bfloat16") for provider in ("fused", "eager", "compile")}
    assert all(float(r["p50"]) > 0 and r["note"] == "" and r["load_before"] != "" for r in rows)
    steps = list(csv.DictReader((tmp_path / "train_step.csv").open()))
    assert {(r["method"], r["variant"]) for r in steps} == {
        (method, variant) for method in ("none", "facd") for variant in ("default", "fp32", "reference-loss")}
    assert {r["phase"] for r in steps if r["method"] == "facd"} >= {"teacher", "student", "term:facd", "backward"}
    assert "compile/fused" in summary and "fp32 / default" in summary
    assert summary.splitlines()[-1].split() == ["verdict", "PASS"]


def test_a_missing_prerequisite_stops_the_part_before_any_build(tmp_path, monkeypatch):
    versions = {"setuptools": "70.3.0"}
    monkeypatch.setattr(gpu_check.importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-headers")})
    monkeypatch.delenv("CPATH", raising=False)
    monkeypatch.setattr(gpu_check, "install", lambda *args: pytest.fail("installed despite a missing prerequisite"))
    assert gpu_check.run_part("tests", tmp_path / "out", dry=True, budget_s=60, pytest_args=[]) == 1
    summary = (tmp_path / "out" / "tests-summary.txt").read_text()
    assert "Python.h" in summary and "setuptools >= 77 (found 70.3.0" in summary
    assert summary.splitlines()[-1].split() == ["verdict", "FAIL"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="{skipped}" tests="2" time="1.5"><testcase classname="tests.test_ops" name="test_a[triton-cuda]" time="1"/>
<testcase classname="tests.test_ops" name="test_b[triton-cuda]" time="0.5">{skip}</testcase></testsuite></testsuites>
"""


@pytest.mark.parametrize("skipped", [0, 1])
def test_a_skipped_triton_case_fails_the_tests(tmp_path, skipped):
    """A skip is how a missing kernel set shows in pytest (the Triton tests skip without triton): it must fail."""
    skip = '<skipped type="pytest.skip" message="the Triton kernels are not available"/>' if skipped else ""
    (tmp_path / "tests-junit.xml").write_text(JUNIT.format(skipped=skipped, skip=skip))
    passed, line = gpu_check.tests_verdict(tmp_path, status=0)
    assert passed == (not skipped)
    if skipped:
        assert "tests.test_ops::test_b[triton-cuda]" in line


def test_no_report_fails_the_tests(tmp_path):
    passed, line = gpu_check.tests_verdict(tmp_path, status=124)
    assert not passed and "no JUnit report" in line
