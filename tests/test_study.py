"""``facd study``: the statistics against hand-worked values, paired runs, a tiny grid resumed after a kill."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from facd_fast.train.config import ConfigError, load_config
from facd_fast.train.study import build_grid, parse_sweep, split_values, study_tables
from facd_fast.train.study.stats import paired_difference, summarize, t_quantile, verdict
from facd_fast.train.trainer import Trainer

from train_fixtures import REPO_ROOT, facd_command, subprocess_env, tiny_config



# --- statistics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    # Two-sided 95% (0.975 one-sided) Student-t quantiles from any statistics table.
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_summary_by_hand():
    stats = summarize([1.0, 2.0, 3.0, 4.0])
    # mean 10/4; std sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); half-width t(3) * std / sqrt(4).
    assert stats["n"] == 4
    assert stats["mean"] == 2.5
    assert stats["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert stats["ci_half"] == pytest.approx(3.182446305 * 1.290994449 / 2, rel=1e-8)
    assert stats["ci_low"] == pytest.approx(2.5 - 2.054260257, rel=1e-8)
    assert stats["ci_high"] == pytest.approx(2.5 + 2.054260257, rel=1e-8)


def test_one_value_has_no_interval():
    stats = summarize([35.0])
    assert stats["mean"] == 35.0 and math.isnan(stats["std"]) and math.isnan(stats["ci_half"])
    assert verdict(stats) == "one seed: no interval"
    with pytest.raises(ValueError):
        summarize([])


def test_paired_difference_by_hand():
    a = {0: 35.0, 1: 35.2, 2: 35.1, 7: 30.0}
    b = {0: 34.9, 1: 35.0, 2: 35.2, 5: 31.0}
    stats = paired_difference(a, b)
    # Seeds 0, 1, 2 only: differences 0.1, 0.2, -0.1; mean 1/15; squared deviations
    # (1/30)^2 + (2/15)^2 + (1/6)^2 = 0.0466667, / 2 -> std 0.1527525; half t(2) * std / sqrt(3).
    assert stats["seeds"] == [0, 1, 2]
    assert stats["mean"] == pytest.approx(1 / 15, rel=1e-9)
    assert stats["std"] == pytest.approx(0.15275252, rel=1e-7)
    assert stats["ci_half"] == pytest.approx(4.30265273 * 0.15275252 / math.sqrt(3), rel=1e-7)
    assert (stats["wins"], stats["losses"], stats["ties"]) == (2, 1, 0)
    assert verdict(stats) == "inside the noise (CI contains 0)"
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_verdict_in_words():
    assert verdict(summarize([0.10, 0.12, 0.11])).startswith("better")
    assert verdict(summarize([-0.10, -0.12, -0.11])).startswith("worse")


# --- the grid ---------------------------------------------------------------------------------------
def test_sweep_values_and_grid():
    assert split_values("0.01, 0.1") == ["0.01", "0.1"]
    assert split_values("[1.0, 0.0, 0.0],[0.0,0.0,1.0]") == ["[1.0, 0.0, 0.0]", "[0.0,0.0,1.0]"]
    assert parse_sweep("distill.lambda=0.01,0.1") == ("distill.lambda", ["0.01", "0.1"])
    with pytest.raises(ConfigError, match="distill.lamda"):
        parse_sweep("distill.lamda=0.1")
    with pytest.raises(ConfigError, match="distill.lambda must be of type float"):
        parse_sweep("distill.lambda=high")
    with pytest.raises(ConfigError, match="--seeds"):
        parse_sweep("run.seed=1,2")
    grid = build_grid(["none", "facd"], [0, 1], [parse_sweep("distill.lambda=0.01,0.1"), parse_sweep("train.lr=1e-4,2e-4")])
    # facd: 2 lambdas x 2 lr x 2 seeds; none ignores lambda: 2 lr x 2 seeds.
    assert len(grid) == 8 + 4
    names = {run.name for run in grid}
    assert "none__train.lr=1e-4" in names and "facd__distill.lambda=0.01__train.lr=2e-4" in names
    run = next(r for r in grid if r.name == "facd__distill.lambda=0.1__train.lr=1e-4" and r.seed == 1)
    assert run.overrides == ["distill.lambda=0.1", "train.lr=1e-4", "distill.method=facd", "run.seed=1"]
    # Overrides for every run or, prefixed, for one method's runs.
    grid = build_grid(["none", "fd-l1", "facd"], [0], [], ["train.iterations=5", "facd:distill.lambda=0.03"])
    assert {run.method: run.overrides[:-2] for run in grid} == {
        "none": ["train.iterations=5"], "fd-l1": ["train.iterations=5"],
        "facd": ["train.iterations=5", "distill.lambda=0.03"]}


# --- pairing ---------------------------------------------------------------------------------------
def test_runs_with_one_seed_start_alike_and_see_the_same_patches(tmp_path):
    config_path = tiny_config(tmp_path)
    firsts = {}
    for method in ("none", "fd-l1", "facd"):
        config = load_config(config_path, [f"distill.method={method}"])
        trainer = Trainer(config, mode="distill")
        batches = trainer._batches()
        firsts[method] = (trainer.student.state_dict(), [next(batches) for _ in range(2)],
                          trainer.model.trainable.adapters)
    reference_weights, reference_batches, _ = firsts["none"]
    for method, (weights, batches, _) in firsts.items():
        assert weights.keys() == reference_weights.keys()
        assert all(torch.equal(weights[k], reference_weights[k]) for k in weights), method
        for (lr, hr), (lr_ref, hr_ref) in zip(batches, reference_batches):
            assert torch.equal(lr, lr_ref) and torch.equal(hr, hr_ref), method
    # The two adapted methods also share their DR adapters' initial weights.
    fd, facd = firsts["fd-l1"][2].state_dict(), firsts["facd"][2].state_dict()
    assert all(torch.equal(fd[k], facd[k]) for k in fd)
    # Another seed gives other weights and other patches.
    other = Trainer(load_config(config_path, ["run.seed=4", "distill.method=none"]), mode="distill")
    assert not torch.equal(next(other._batches())[1], reference_batches[0][1])
    assert not all(torch.equal(v, reference_weights[k]) for k, v in other.student.state_dict().items())


# --- a tiny study, killed and resumed -------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_resumes_after_a_kill_and_summarises(tmp_path):
    config = tiny_config(tmp_path, train={"iterations": 8, "checkpoint_every": 2, "val_every": 4})
    out = tmp_path / "study"
    command = facd_command("study", str(config), "--methods", "none,facd", "--seeds", "0,1", "--jobs", "2",
                           "--sweep", "distill.lambda=0.1", "--out", str(out))
    # Kill the whole study (parent and children) once some run has a checkpoint.
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("runs/*/seed*/*/checkpoints/last.pt")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list(out.glob("runs/*/seed*/*/checkpoints/last.pt")), "no run reached a checkpoint before the kill"
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/result.json")}
    assert len(done_before) < 4

    finished = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = sorted(out.glob("runs/*/seed*/result.json"))
    assert len(results) == 4
    for path, mtime in done_before.items():  # finished runs were not run again
        assert path.stat().st_mtime_ns == mtime
    resumed = [json.loads(p.read_text())["train"]["resumed"] for p in results if p not in done_before]
    assert any(resumed), "no run resumed from its checkpoint"
    for path in results:
        result = json.loads(path.read_text())
        assert result["train"]["steps"] == 8
        assert set(result["evals"]) == {"val"} and len(result["evals"]["val"]["images"]) == 2

    study = json.loads((out / "study.json").read_text())
    assert study["finished"] == 4 and len(study["rows"]) == 4
    groups = study["evals"]["val"]["groups"]
    assert [(g["method"], g["psnr_y"]["n"]) for g in groups] == [("none", 2), ("facd", 2)]
    for group in groups:
        values = [r["mean_psnr_y"] for r in study["rows"] if r["method"] == group["method"]]
        assert group["psnr_y"]["mean"] == pytest.approx(sum(values) / 2)
    (comparison,) = study["evals"]["val"]["comparisons"]
    assert (comparison["a"], comparison["b"]) == ("facd", "none")
    by_seed = {(r["method"], r["seed"]): r["mean_psnr_y"] for r in study["rows"]}
    expected = [by_seed[("facd", s)] - by_seed[("none", s)] for s in (0, 1)]
    assert comparison["psnr_y_diff"]["mean"] == pytest.approx(sum(expected) / 2)
    assert study_tables(study) in (out / "study.md").read_text()
    assert (out / "study_val.png").stat().st_size > 0
    assert "facd − none" in finished.stdout

    # A third call finds everything done and trains nothing; other --set values in the same folder are refused.
    again = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "(4 already done)" in again.stdout
    other = subprocess.run(command + ["--set", "train.lr=1e-3"], cwd=REPO_ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "holds a run of another config" in other.stderr


def test_study_rejects_bad_arguments(tmp_path):
    from facd_fast.cli import main

    config = tiny_config(tmp_path)
    assert main(["study", str(config), "--methods", "none,fdd", "--out", str(tmp_path / "s")]) == 2
    assert main(["study", str(config), "--baseline", "fakd", "--out", str(tmp_path / "s")]) == 2
    assert main(["study", str(config), "--eval-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert main(["study", str(config), "--seeds", "0,x", "--out", str(tmp_path / "s")]) == 2
    assert main(["study", str(config), "--methods", "none,facd", "--set", "fd-l1:distill.lambda=0.1",
                 "--out", str(tmp_path / "s")]) == 2
    assert main(["study", str(config), "--set", "facd:distill.lamda=0.1", "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s" / "runs").exists()


# --- diagnostics ------------------------------------------------------------------------------------
def test_term_gradient_norms_by_hand():
    from facd_fast.train.diagnostics import term_gradient_norms

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([0.5], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([-4.0, 3.0])
    parts = {
        "pixel": (w * a).sum(),                      # gradient (3, 4 | 0): norm 5
        "output": 2.0 * (w * a).sum() + 0.0 * v.sum(),  # (6, 8 | 0): norm 10, cosine 1
        "feature": (w * b).sum() + (v * 12.0).sum(),   # (-4, 3 | 12): norm 13, cosine 0
        "constant": torch.tensor(1.0),               # no gradient at all
    }
    values = term_gradient_norms(parts, [w, v])
    assert values["grad_pixel"] == pytest.approx(5.0)
    assert values["grad_output"] == pytest.approx(10.0)
    assert values["grad_feature"] == pytest.approx(13.0)
    assert values["grad_constant"] == 0.0
    assert values["cos_output_pixel"] == pytest.approx(1.0)
    assert values["cos_feature_pixel"] == pytest.approx(0.0, abs=1e-7)
    assert w.grad is None  # nothing accumulated into .grad
    # After the step's own backward (graph kept), the first part's gradient is the total minus the others'.
    sum(parts.values()).backward(retain_graph=True)
    derived = term_gradient_norms(parts, [w, v], total=[w.grad, v.grad])
    assert derived == pytest.approx(values)
    # a loss of one part needs no pass at all: its gradient is the total
    w.grad = None
    assert term_gradient_norms({"pixel": parts["pixel"]}, [w], total=[torch.tensor([3.0, 4.0])]) == {"grad_pixel": 5.0}


def test_objective_parts_sum_to_the_loss():
    from facd_fast.train.objective import DistillationObjective

    torch.manual_seed(0)
    sr_s, sr_t, hr = (torch.rand(2, 3, 8, 8, requires_grad=i == 0) for i in range(3))
    feats_s = [torch.randn(2, 4, 4, 4, requires_grad=True) for _ in range(3)]
    feats_t = [torch.randn(2, 4, 4, 4) for _ in range(3)]
    for method in ("fd-l1", "facd"):
        objective = DistillationObjective(method, alpha=0.3, feature_weight=0.05, backend="reference")
        loss, terms, parts = objective(sr_s, feats_s, sr_t, feats_t, hr, return_parts=True)
        assert set(parts) == {"pixel", "output", "feature"}
        parts = {name: float(part.detach()) for name, part in parts.items()}
        assert sum(parts.values()) == pytest.approx(float(loss.detach()))
        assert parts["pixel"] == pytest.approx(0.7 * float(terms["l1_hr"]))
        assert parts["feature"] == pytest.approx(0.05 * float(terms["feature"]))


def test_trainer_logs_gradient_norms_on_log_steps_and_warms_lambda_up(tmp_path):
    import json as _json

    config = load_config(tiny_config(tmp_path), [
        "distill.method=fd-l1", "distill.lambda=0.2", "distill.lambda_warmup=4", "train.iterations=6",
        "train.log_every=2", f"run.out_dir={tmp_path / 'run'}",
    ])
    Trainer(config, mode="distill").fit()
    records = [_json.loads(line) for line in (tmp_path / "run" / "fd-l1" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["lambda"] for r in train] == pytest.approx([0.1, 0.2, 0.2])
    for record in train:
        assert record["grad_pixel"] > 0 and record["grad_output"] > 0 and record["grad_feature"] > 0
        assert -1.0 <= record["cos_feature_pixel"] <= 1.0 and -1.0 <= record["cos_output_pixel"] <= 1.0

    quiet = load_config(tiny_config(tmp_path), ["distill.method=none", "train.iterations=2", "train.log_every=1",
                                                "train.grad_norms=false", f"run.out_dir={tmp_path / 'quiet'}"])
    Trainer(quiet, mode="distill").fit()
    records = [_json.loads(line) for line in (tmp_path / "quiet" / "none" / "log.jsonl").read_text().splitlines()]
    assert all("grad_pixel" not in r and "lambda" not in r for r in records)


@pytest.mark.slow
def test_demo_runs_the_methods_over_seeds_and_prints_the_paired_table(tmp_path, capsys):
    from facd_fast.train.demo import DEMO_METHODS, run_demo

    config = tiny_config(tmp_path, train={"iterations": 4, "checkpoint_every": 4, "val_every": 4})
    results = run_demo(out_dir=tmp_path / "demo", config_path=str(config), seeds=2, jobs=2)
    printed = capsys.readouterr().out
    assert [g["method"] for g in results["groups"]] == list(DEMO_METHODS)
    assert all(g["psnr_y"]["n"] == 2 for g in results["groups"])
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [("fd-l1", "none"), ("facd", "none"), ("facd", "fd-l1")]
    for comparison in results["comparisons"]:
        assert comparison["verdict"] in printed
    assert "student (facd)" in printed and "Paired by seed" in printed
    assert "What these photos support:" in printed and "FACD >= FD:" in printed and "docs/results.md" in printed
    for method in DEMO_METHODS:
        assert (tmp_path / "demo" / f"student_{method}.pth").is_file()
    for name in ("curves.png", "comparison.png", "results.json", "study/study.json", "study/study_val.png"):
        assert (tmp_path / "demo" / name).is_file()
    # The same folder with other settings: refused before any training, nothing lost.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "study" / "runs").rglob("result.json")}
    with pytest.raises(ConfigError, match="demo with other settings: pass --overwrite"):
        run_demo(out_dir=tmp_path / "demo", config_path=str(config), overrides=["train.lr=1e-3"], seeds=2, jobs=2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo" / "study" / "runs").rglob("result.json")} == before


def test_demo_says_which_claims_its_photos_support():
    from facd_fast.train.demo import STUDY_COMMAND, _claims

    def comparison(a, b, mean, half, n=4):
        return {"a": a, "b": b, "psnr_y_diff": {"n": n, "mean": mean, "ci_half": half}}

    above = _claims([comparison("facd", "none", 0.12, 0.05), comparison("facd", "fd-l1", 0.03, 0.05)])
    assert "FACD beats the student alone: yes, the 95% CI of FACD - none lies above 0 (lower bound +0.070 dB)" in above
    assert "FACD >= FD: yes, the mean paired difference is +0.030 dB (CI contains 0: inside the noise)" in above
    assert STUDY_COMMAND in above
    noise = _claims([comparison("facd", "none", 0.02, 0.05), comparison("facd", "fd-l1", -0.01, 0.005)])
    assert "FACD beats the student alone: not shown by 4 seeds here (the 95% CI of FACD - none reaches -0.030 dB)" in noise
    assert "FACD >= FD: no, the mean paired difference is -0.010 dB" in noise and "inside the noise" not in noise
