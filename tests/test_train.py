"""The trainer: objective and baselines, EMA, bit-exact resume after SIGKILL, and 2-process DDP under torchrun."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from facd_fast import reference
from facd_fast.train.config import load_config
from facd_fast.train.ema import ModelEMA
from facd_fast.train.feature_losses import affinity_distance, feature_distance, spatial_affinity
from facd_fast.train.objective import DistillationObjective, mask_enabled
from facd_fast.train.trainer import Trainer
from facd_fast.train.training_state import atomic_torch_save, load_training_state
from train_fixtures import REPO_ROOT, facd_command, run_facd, subprocess_env, tiny_config


def _images(batch=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hr = torch.rand(batch, 3, size, size, generator=generator, dtype=torch.float64)
    sr_student = (hr + 0.2 * torch.randn(hr.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    sr_teacher = (hr + 0.1 * torch.randn(hr.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    # Patch 0: the teacher is worse than the student, so the mask drops it.
    sr_teacher[0] = (hr[0] + 0.5).clamp(0, 1)
    return sr_student.requires_grad_(True), sr_teacher, hr


def _features(batch=4, channels=(5, 6, 7), size=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, c, size, size, generator=generator, dtype=torch.float64) for c in channels]
    teacher = [torch.randn(batch, c, size, size, generator=generator, dtype=torch.float64) for c in channels]
    return student, teacher


def test_fd_with_channel_normalisation_is_facd_positive_distance():
    student, teacher = _features()
    for distance in ("l1", "l2"):
        for s, t in zip(student, teacher):
            d_pos, _ = reference.feature_distances(s, t, None, distance, "channel")
            torch.testing.assert_close(feature_distance(s, t, distance, "channel"), d_pos)


def test_fd_without_normalisation_is_fitnet():
    s, t = _features()[0][0], _features()[1][0]
    torch.testing.assert_close(feature_distance(s, t, "l2", "none"), ((s - t) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(feature_distance(s, t, "l1", "none"), (s - t).abs().mean(dim=(1, 2, 3)))


def test_spatial_affinity_is_cosine_similarity_of_positions():
    features = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    affinity = spatial_affinity(features)
    assert affinity.shape == (2, 15, 15)
    flat = features.flatten(2)
    for b in range(2):
        for p in (0, 7):
            for q in (3, 14):
                expected = F.cosine_similarity(flat[b, :, p], flat[b, :, q], dim=0)
                torch.testing.assert_close(affinity[b, p, q], expected)


def test_fakd_compares_features_of_different_widths():
    student = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    assert affinity_distance(student, student.repeat(1, 2, 1, 1)).abs().max() < 1e-12  # same directions
    assert (affinity_distance(student, torch.randn(3, 16, 4, 4, dtype=torch.float64)) > 0).all()


def test_objective_none_is_l1_to_hr():
    sr_student, _, hr = _images()
    loss, terms = DistillationObjective("none")(sr_student, None, None, None, hr)
    torch.testing.assert_close(loss, F.l1_loss(sr_student.float(), hr.float()))
    assert set(terms) == {"loss", "l1_hr"}


@pytest.mark.parametrize("method", ["fd-l1", "fd-l2", "fakd"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_baseline_objective_matches_its_formula(method, use_mask):
    sr_student, sr_teacher, hr = _images()
    student, teacher = _features(channels=(6, 6, 6))
    objective = DistillationObjective(method, alpha=0.3, feature_weight=0.7, tap_weights=(1.0, 0.5, 2.0), use_mask=use_mask)
    loss, terms = objective(sr_student, student, sr_teacher, teacher, hr)

    mse_student = ((sr_student.detach() - hr) ** 2).mean(dim=(1, 2, 3))
    mse_teacher = ((sr_teacher - hr) ** 2).mean(dim=(1, 2, 3))
    mask = (mse_student > mse_teacher).double() if use_mask else torch.ones(4, dtype=torch.float64)
    if use_mask:
        assert mask[0] == 0 and mask.sum() >= 1
    per_patch_teacher = (sr_student.float() - sr_teacher.float()).abs().mean(dim=(1, 2, 3))
    feature = 0.0
    for w, s, t in zip((1.0, 0.5, 2.0), student, teacher):
        if method == "fakd":
            per_patch = (spatial_affinity(s) - spatial_affinity(t)).abs().mean(dim=(1, 2))
        else:
            per_patch = feature_distance(s, t, {"fd-l1": "l1", "fd-l2": "l2"}[method], "channel")
        feature = feature + w * (per_patch * mask).sum() / 4
    expected = (0.7 * F.l1_loss(sr_student.float(), hr.float()) + 0.3 * (per_patch_teacher * mask.float()).sum() / 4
                + 0.7 * feature.float())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["distilled_fraction"], mask.float().mean())
    loss.backward()
    assert sr_student.grad is not None and torch.isfinite(sr_student.grad).all()


@pytest.mark.parametrize("method", ["facd", "facd-nomask"])
def test_facd_objective_gates_both_terms_with_the_mask(method):
    sr_student, sr_teacher, hr = _images()
    student, teacher = _features(channels=(6, 6, 6))
    use_mask = mask_enabled(method, "auto")
    objective = DistillationObjective(method, alpha=0.5, feature_weight=1.0, use_mask=use_mask)
    loss, terms = objective(sr_student, student, sr_teacher, teacher, hr)
    mask = reference.adaptive_mask(sr_student.detach(), sr_teacher, hr) if use_mask else torch.ones(4, dtype=torch.bool)
    facd = sum(reference.contrastive_loss(s, t, mask=mask if use_mask else None) for s, t in zip(student, teacher))
    output = ((sr_student.float() - sr_teacher.float()).abs().mean(dim=(1, 2, 3)) * mask.float()).sum() / 4
    expected = 0.5 * F.l1_loss(sr_student.float(), hr.float()) + 0.5 * output + facd.float()
    torch.testing.assert_close(loss, expected)
    assert float(terms["distilled_fraction"]) == pytest.approx(float(mask.float().mean()))


def test_objective_distance_comes_from_the_fd_method_name_or_distill_distance():
    sr_student, sr_teacher, hr = _images()
    student, teacher = _features(channels=(6, 6, 6))
    for method, named in (("fd-l1", "l1"), ("fd-l2", "l2")):
        # "auto" and the named distance give the same objective; the other distance is refused, not ignored
        losses = [DistillationObjective(method, use_mask=False, distance=distance)(sr_student, student, sr_teacher,
                                                                                     teacher, hr)[0]
                  for distance in ("auto", named)]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
        with pytest.raises(ValueError, match="contradicts distill.method"):
            DistillationObjective(method, distance="l2" if named == "l1" else "l1")
    assert DistillationObjective("facd").facd.distance == "l1"
    assert DistillationObjective("facd", distance="l2").facd.distance == "l2"
    assert DistillationObjective("fakd", distance="l2").distance is None


def test_mask_setting_per_method():
    assert mask_enabled("facd", "auto") and not mask_enabled("facd-nomask", "auto")
    assert not mask_enabled("facd-nomask", True) and not mask_enabled("none", True)
    assert not mask_enabled("fd-l1", "auto") and mask_enabled("fd-l1", True)


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    before = ema.shadow.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow.weight, 0.9 * before + 0.1 * model.weight.detach())
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_the_ema_copy_does_not_feed_the_trained_models_taps():
    from facd_fast import FeatureTaps

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    taps = FeatureTaps(model, ["0"])
    ema = ModelEMA(model, decay=0.9)
    model(torch.rand(2, 3, 5, 5))
    recorded = taps.features()[0]
    ema.shadow(torch.rand(1, 3, 9, 9))  # validation of the EMA network, as the trainer runs it
    assert taps.features()[0] is recorded
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ema.shadow.modules())


def test_an_objective_whose_terms_all_weigh_zero_is_a_config_error():
    from facd_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="every term of method 'fd-l1' has weight 0"):
        DistillationObjective("fd-l1", alpha=0.0, feature_weight=0.0, terms={"pixel": 0.0})


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "a" / "state.pt")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["state.pt"]
    with pytest.raises(ValueError, match="not a facd_fast training checkpoint"):
        load_training_state(tmp_path / "a" / "state.pt")


def _final_state(run_dir):
    return load_training_state(run_dir / "facd" / "checkpoints" / "last.pt")


def test_resume_after_sigkill_equals_uninterrupted_run_bit_for_bit(tmp_path):
    config = tiny_config(tmp_path, train={"iterations": 40, "checkpoint_every": 4, "val_every": 1000, "log_every": 4,
                                          "ema_decay": 0.9})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_facd("distill", str(config), "--set", f"run.out_dir={straight}")
    assert result.returncode == 0, result.stderr

    process = subprocess.Popen(facd_command("distill", str(config), "--set", f"run.out_dir={killed}"),
                               cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "facd" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = load_training_state(checkpoint)["step"]
    assert 0 < interrupted_at < 40

    result = run_facd("distill", str(config), "--set", f"run.out_dir={killed}", "--resume")
    assert result.returncode == 0, result.stderr
    expected, resumed = _final_state(straight), _final_state(killed)
    assert resumed["step"] == expected["step"] == 40
    for part in ("model", "adapters", "ema"):
        assert expected[part].keys() == resumed[part].keys()
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["optimizer"]["state"][index]["exp_avg"])
    # The resumed log continues the interrupted one without repeating steps.
    steps = [json.loads(line)["step"] for line in (killed / "facd" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(4, 41, 4))


def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    config = tiny_config(tmp_path, train={"iterations": 4, "val_every": 2, "checkpoint_every": 2})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "facd_fast", "distill", str(config), "--method", "fd-l1"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "fd-l1" / "log.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["kind"] == "end"]
    assert len(ends) == 1, "only rank 0 may log"
    assert ends[0]["world_size"] == 2
    assert ends[0]["replica_max_abs_diff"] == 0.0
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    state = load_training_state(tmp_path / "run" / "fd-l1" / "checkpoints" / "last.pt")
    assert state["step"] == 4
    # One RNG state per rank, and they differ: the ranks drew different crops.
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    # Resume both processes from the checkpoint and train on to step 6.
    result = subprocess.run(command + ["--set", "train.iterations=6", "--resume"], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "fd-l1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    ends = [r for r in records if r["kind"] == "end"]
    assert len(ends) == 1 and ends[0]["steps"] == 6 and ends[0]["replica_max_abs_diff"] == 0.0


def test_step_breakdown_times_each_phase_of_real_steps(tmp_path):
    import csv

    from facd_fast.bench import train_step

    rows = train_step.run(out_dir=tmp_path, setting="demo", methods=("none", "facd"), steps=2, rounds=1,
                          device="cpu", sets=["train.batch_size=2", "data.patch_size=16", "train.log_every=2"])
    cases = {(r["method"], r["variant"]) for r in rows}
    assert cases == {("none", "default"), ("facd", "default"), ("none", "fp32"), ("facd", "fp32")}
    by_case = {}
    for row in rows:
        by_case.setdefault((row["method"], row["variant"]), {})[row["phase"]] = row
    for (method, variant), phases in by_case.items():
        assert {"data", "student", "term:pixel", "backward", "guard", "optimizer", "ema", "other"} <= set(phases)
        assert ("teacher" in phases) == (method == "facd") and ("term:facd" in phases) == (method == "facd")
        first = next(iter(phases.values()))
        # the phases and "other" add up to the mean step; "other" is never negative
        total = sum(float(r["ms_per_step"]) for r in phases.values())
        assert total == pytest.approx(first["step_ms_mean"], rel=0.02) and phases["other"]["ms_per_step"] >= 0
        assert first["steps"] == 2 and first["cpu"] and first["load_before"] == first["load_before"]
    assert by_case[("facd", "fp32")]["teacher"]["teacher_precision"] == "fp32"
    assert by_case[("facd", "fp32")]["teacher"]["amp"] == "off"
    written = list(csv.DictReader((tmp_path / "train_step.csv").open()))
    assert len(written) == len(rows) and (tmp_path / "train_step.png").stat().st_size > 0


def test_a_reduced_precision_teacher_serves_the_whole_run_plots_included(tmp_path):
    """The teacher is stored in its precision (bf16 weights): everything that runs it goes through
    Distiller.teacher_forward, the end-of-run comparison plot too."""
    config = load_config(tiny_config(tmp_path), ["distill.teacher_precision=bf16", "train.plots=true",
                                                 "train.iterations=2", f"run.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, mode="distill")
    assert trainer.model.teacher_precision == "bf16" and trainer.teacher.conv_first.weight.dtype == torch.bfloat16
    assert trainer.teacher.conv_last.weight.dtype == torch.float32  # the output layer stays float32
    summary = trainer.fit()
    assert (tmp_path / "run" / "facd" / "comparison.png").stat().st_size > 0 and len(summary["plots"]) == 2
    setup = [json.loads(line) for line in (tmp_path / "run" / "facd" / "log.jsonl").read_text().splitlines()][0]
    assert setup["kind"] == "setup" and setup["teacher_precision"] == "bf16"
    assert abs(setup["teacher_psnr_drop_db"]) < 0.1
