"""Every case of the "trustworthy runs and clear errors" issue, walked through as a user meets it.

Each case asserts the error type (or exit status) and that the message names
the culprit, or that nothing was lost, overwritten or written non-finite.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import facd_fast
from facd_fast import models
from facd_fast.cli import main
from facd_fast.data import BenchmarkFolder, PairedFolderDataset
from facd_fast.data.images import ImageReadError
from facd_fast.train.training_state import load_training_state

from image_files import write_png16, write_truncated
from train_fixtures import tiny_config, write_images

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished 6-step facd run (in process, not deterministic: that mode would leak into other tests)."""
    tmp = tmp_path_factory.mktemp("safety")
    config = tiny_config(tmp, run={"deterministic": False})
    assert main(["distill", str(config)]) == 0
    return {"tmp": tmp, "config": config, "run": tmp / "run" / "facd"}


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("facd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def assert_all_finite(state: dict) -> None:
    for part in ("model", "adapters", "ema"):
        for key, tensor in (state.get(part) or {}).items():
            assert torch.isfinite(tensor).all(), f"{part}.{key}"


# ---------------------------------------------------------------- 1. divergence


def test_diverging_run_skips_bad_steps_stops_and_writes_nothing_non_finite(first_run, tmp_path, capsys):
    out = tmp_path / "diverge"
    status = main(["distill", str(first_run["config"]), "--set", f"run.out_dir={out}", "--set", "train.lr=1e3",
                   "--set", "train.iterations=30", "--set", "train.checkpoint_every=1", "--set", "train.max_bad_steps=4"])
    assert status == 3
    line = one_error_line(capsys)
    assert "training diverged: 4 steps in a row" in line and "at step 5 the l1_hr term is nan" in line, line
    assert "holds step 1" in line and "train.lr" in line and "train.max_bad_steps" in line
    run = out / "facd"
    records = [json.loads(text) for text in (run / "log.jsonl").read_text().splitlines()]
    skips = [r for r in records if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [2, 3, 4, 5] and skips[-1]["in_a_row"] == 4
    assert records[-1]["kind"] == "diverged"
    assert [r["skipped_steps"] for r in records if r["kind"] == "train"] == [0, 1, 2, 3]  # step 5 stopped the run
    state = load_training_state(run / "checkpoints" / "last.pt")
    assert state["step"] == 1  # the last step that trained; the skipped ones wrote nothing
    assert_all_finite(state)
    assert not (run / "facd.pth").exists()
    assert not list(run.rglob("*.tmp"))


def test_a_bad_step_changes_no_weight_and_training_goes_on(first_run, tmp_path, monkeypatch):
    from facd_fast.train.config import load_config
    from facd_fast.train.objective import DistillationObjective
    from facd_fast.train.trainer import Trainer

    config = load_config(first_run["config"], [f"run.out_dir={tmp_path}", "train.iterations=4", "train.val_every=100"])
    trainer = Trainer(config, mode="distill")
    forward = DistillationObjective.forward

    def nan_feature_at_step_2(self, *args, return_parts=False, **kwargs):
        loss, terms, parts = forward(self, *args, return_parts=True, **kwargs)
        if trainer.step == 1:  # the second step (trainer.step counts steps done)
            terms["feature"] = terms["feature"] * float("nan")
            loss = loss + terms["feature"]
        return (loss, terms, parts) if return_parts else (loss, terms)

    monkeypatch.setattr(DistillationObjective, "forward", nan_feature_at_step_2)
    before = {}
    original_step = trainer.train_step

    def recording_step(lr, hr, **kwargs):
        before[trainer.step] = {k: v.clone() for k, v in trainer.model.trainable.state_dict().items()}
        return original_step(lr, hr, **kwargs)

    trainer.train_step = recording_step
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    after_bad = before[2]
    for key, value in before[1].items():
        assert torch.equal(value, after_bad[key]), key  # step 2 (index 1 -> 2) changed nothing
    assert any(not torch.equal(before[2][k], before[3][k]) for k in before[2])  # step 3 trained again
    from facd_fast.train.run_log import progress_postfix

    assert progress_postfix({"loss": 0.1}, trainer.guard.skipped_steps, float("nan"))["skipped"] == "1"
    skips = [json.loads(t) for t in trainer.log.path.read_text().splitlines() if '"skip"' in t]
    assert [(r["step"], r["problem"]) for r in skips] == [(2, "the feature term is nan")]


def test_loaders_refuse_non_finite_weights_naming_the_file(first_run, tmp_path, capsys):
    state = load_training_state(first_run["run"] / "checkpoints" / "last.pt")
    key = next(iter(state["model"]))
    state["model"][key][0] = float("nan")
    poisoned = tmp_path / "nan.pt"
    torch.save(state, poisoned)
    val_dir = first_run["tmp"] / "data" / "val"
    assert main(["eval", str(poisoned), "--hr-dir", str(val_dir), "--scale", "2"]) == 2
    line = one_error_line(capsys)
    assert str(poisoned) in line and key in line and "NaN/Inf" in line
    assert main(["export", str(poisoned), str(tmp_path / "out.pth")]) == 2
    assert str(poisoned) in one_error_line(capsys) and not (tmp_path / "out.pth").exists()
    exported = tmp_path / "nan.pth"
    network = models.model_from_checkpoint(first_run["run"] / "facd.pth")
    torch.save(models.model_file_dict({k: v.clone() for k, v in network.state_dict().items()},
                                      models.model_meta(network)), exported)
    weights = torch.load(exported, weights_only=True)
    weights["params"]["conv_last.bias"][0] = float("inf")
    torch.save(weights, exported)
    with pytest.raises(ValueError, match=f"{exported}.*conv_last.bias"):
        models.model_from_checkpoint(exported)
    with pytest.raises(ValueError, match="conv_last.bias"):
        models.save_checkpoint_basicsr(_with_nan(network), tmp_path / "never.pth")
    assert not (tmp_path / "never.pth").exists()


def _with_nan(network):
    with torch.no_grad():
        network.conv_last.bias[0] = float("nan")
    return network


# ---------------------------------------------------------------- 2. no silent overwrite


def test_second_run_without_resume_is_refused_and_the_first_stays_byte_identical(first_run, capsys):
    before = digests(first_run["run"])
    assert main(["distill", str(first_run["config"])]) == 2
    line = one_error_line(capsys)
    assert str(first_run["run"]) in line and "--resume" in line and "--overwrite" in line
    assert digests(first_run["run"]) == before
    assert main(["distill", str(first_run["config"]), "--resume", "--overwrite"]) == 2
    assert "contradict" in one_error_line(capsys)
    assert digests(first_run["run"]) == before


def test_overwrite_replaces_and_resume_continues(first_run, tmp_path, capsys):
    run_root = tmp_path / "copy"
    shutil.copytree(first_run["run"], run_root / "facd")
    (run_root / "facd" / "notes.txt").write_text("mine")
    (run_root / "facd" / "checkpoints" / "best.pt").write_text("also mine")
    args = ["distill", str(first_run["config"]), "--set", f"run.out_dir={run_root}"]
    assert main([*args, "--resume", "--set", "train.iterations=8"]) == 0
    records = [json.loads(t) for t in (run_root / "facd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))  # 1-6 kept, 7-8 added
    assert main([*args, "--overwrite", "--set", "train.iterations=2"]) == 0
    records = [json.loads(t) for t in (run_root / "facd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert load_training_state(run_root / "facd" / "checkpoints" / "last.pt")["step"] == 2
    assert (run_root / "facd" / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert (run_root / "facd" / "checkpoints" / "best.pt").read_text() == "also mine"


def test_stale_temporary_files_of_a_killed_write_are_removed_by_the_next_run(first_run, tmp_path):
    run_root = tmp_path / "killed"
    shutil.copytree(first_run["run"], run_root / "facd")
    stale = [run_root / "facd" / "checkpoints" / ".last.pt.k1ll3d.tmp", run_root / "facd" / ".facd.pth.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    assert main(["distill", str(first_run["config"]), "--set", f"run.out_dir={run_root}", "--resume"]) == 0
    assert not any(path.exists() for path in stale)
    assert not list((run_root / "facd").rglob("*.tmp"))


# ---------------------------------------------------------------- 3. the config is checked before anything is written


@pytest.mark.parametrize("override, key", [
    ("train.iterations=-5", "train.iterations"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.log_every=0", "train.log_every"),
    ("train.lr_step=0", "train.lr_step"),
    ("train.val_every=0", "train.val_every"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("distill.margin_db=nan", "distill.margin_db"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("distill.lambda=-1", "distill.lambda"),
    ("distill.tap_weights=[1.0, inf, 1.0]", "distill.tap_weights[1]"),
    ("train.lr=nan", "train.lr"),
    ("train.betas=[0.9, 1.0]", "train.betas[1]"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("run.device=cuda", "run.device"),
    ("run.device=warp9", "run.device"),
    ("run.seed=-1", "run.seed"),
    ("model.scale=5", "model.scale"),
    ("data.patch_size=15", "data.patch_size"),
    ("distill.backend=fastest", "distill.backend"),
])
def test_bad_config_values_are_named_before_anything_is_written(first_run, tmp_path, capsys, override, key):
    if override == "run.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "never"
    assert main(["distill", str(first_run["config"]), "--set", f"run.out_dir={out}", "--set", override]) == 2
    line = one_error_line(capsys)
    assert key in line, line
    assert not out.exists()


def test_facd_batch_of_one_is_refused_before_the_run(first_run, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["distill", str(first_run["config"]), "--set", f"run.out_dir={out}", "--set", "train.batch_size=1"]) == 2
    assert "train.batch_size" in one_error_line(capsys) and not out.exists()


# ---------------------------------------------------------------- 4. eval and export of bad files


def bad_files(folder: Path, good: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"truncated": write_truncated(folder / "truncated.pth", good), "empty": folder / "empty.pth",
             "foreign": folder / "notes.pth", "image": folder / "photo.pth", "a list": folder / "list.pth",
             "a folder": folder / "dir.pth"}
    files["empty"].write_bytes(b"")
    files["foreign"].write_text("these are my notes, not weights\n")
    Image.new("RGB", (4, 4)).save(files["image"], format="PNG")
    torch.save([1, 2, 3], files["a list"])
    files["a folder"].mkdir()
    return files


def test_eval_and_export_of_bad_files_name_the_file(first_run, tmp_path, capsys):
    val_dir = first_run["tmp"] / "data" / "val"
    for kind, path in bad_files(tmp_path / "bad", first_run["run"] / "facd.pth").items():
        assert main(["eval", str(path), "--hr-dir", str(val_dir), "--scale", "2"]) == 2, kind
        assert str(path) in one_error_line(capsys), kind
        assert main(["export", str(path), str(tmp_path / "out.pth")]) == 2, kind
        assert str(path) in one_error_line(capsys), kind
        assert main(["distill", str(first_run["config"]), "--set", f"run.out_dir={tmp_path / kind}",
                     "--set", f"model.teacher_checkpoint={path}"]) == 2, kind
        assert str(path) in one_error_line(capsys), kind
    assert not (tmp_path / "out.pth").exists()


def test_export_never_replaces_a_folder_or_a_file_unasked(first_run, tmp_path, capsys):
    checkpoint = first_run["run"] / "checkpoints" / "last.pt"
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(checkpoint), str(folder)]) == 2
    assert str(folder) in one_error_line(capsys)
    target = tmp_path / "student.pth"
    target.write_bytes(b"precious")
    assert main(["export", str(checkpoint), str(target)]) == 2
    assert "--overwrite" in one_error_line(capsys) and target.read_bytes() == b"precious"
    assert main(["export", str(checkpoint), str(target), "--overwrite"]) == 0
    assert models.model_from_checkpoint(target).scale == 2
    before = checkpoint.read_bytes()
    assert main(["export", str(checkpoint), str(checkpoint), "--overwrite"]) == 2
    assert "is the checkpoint being exported" in one_error_line(capsys) and checkpoint.read_bytes() == before


def test_bad_eval_device_is_one_line(first_run, capsys):
    val_dir = first_run["tmp"] / "data" / "val"
    assert main(["eval", str(first_run["run"] / "facd.pth"), "--hr-dir", str(val_dir), "--scale", "2",
                 "--device", "gpu9"]) == 2
    assert "--device" in one_error_line(capsys)


# ---------------------------------------------------------------- 5. images


def test_16_bit_grey_scores_as_its_8_bit_twin_not_as_white(first_run, tmp_path, capsys):
    grey8 = np.array(Image.open(first_run["tmp"] / "data" / "val" / "img00.png").convert("L"))
    (tmp_path / "8").mkdir()
    Image.fromarray(grey8).save(tmp_path / "8" / "a.png")
    write_png16(tmp_path / "16" / "a.png", grey8.astype(np.uint16) * 257)
    export = str(first_run["run"] / "facd.pth")
    scores = []
    for folder in ("8", "16"):
        assert main(["eval", export, "--hr-dir", str(tmp_path / folder), "--scale", "2", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["mean_psnr_y"])
    assert scores[0] == scores[1]


def test_unreadable_eval_image_is_an_error_or_an_explicit_skip(first_run, tmp_path, capsys):
    folder = tmp_path / "val"
    shutil.copytree(first_run["tmp"] / "data" / "val", folder)
    broken = write_truncated(folder / "broken.png", folder / "img00.png")
    export = str(first_run["run"] / "facd.pth")
    assert main(["eval", export, "--hr-dir", str(folder), "--scale", "2", "--json"]) == 2
    assert str(broken) in one_error_line(capsys)
    assert main(["eval", export, "--hr-dir", str(folder), "--scale", "2", "--json", "--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [s["file"] for s in result["skipped"]] == [str(broken)] and len(result["images"]) == 2
    assert f"facd: warning: skipped unreadable image {broken}" in captured.err


def test_too_small_eval_image_is_named(first_run, tmp_path, capsys):
    folder = write_images(tmp_path / "val", 1, 40, seed=2)
    Image.new("RGB", (40, 12)).save(folder / "thin.png")
    assert main(["eval", str(first_run["run"] / "facd.pth"), "--hr-dir", str(folder), "--scale", "2"]) == 2
    line = one_error_line(capsys)
    assert str(folder / "thin.png") in line and "15x15" in line


def test_training_folders_decode_like_eval_folders(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: a viewer shows white
    (tmp_path / "hr").mkdir()
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "hr" / "a.png")
    dataset = PairedFolderDataset(tmp_path / "hr", 2, 16, augment=False)
    assert (dataset.images[0][1] == 255).all()
    assert (BenchmarkFolder(tmp_path / "hr", 2)[0][2] == 1.0).all()
    with pytest.raises(ImageReadError, match="broken.png"):
        write_truncated(tmp_path / "hr" / "broken.png", tmp_path / "hr" / "a.png")
        BenchmarkFolder(tmp_path / "hr", 2)


# ---------------------------------------------------------------- 6. the API


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(distance="l3"), ValueError, "distance"),
    (dict(use_mask="no"), TypeError, "use_mask"),
    (dict(tap_weights=(1.0, float("nan"), 1.0)), ValueError, "tap_weights"),
    (dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a real number"),
    (dict(margin_db=True), TypeError, "margin_db"),
])
def test_facd_loss_checks_when_built(kwargs, error, name):
    with pytest.raises(error, match=name):
        facd_fast.FACDLoss(**kwargs)


@pytest.mark.parametrize("make, error, name", [
    (lambda x: x.to("meta"), ValueError, "student"),
    (lambda x: x.to_sparse(), TypeError, "student"),
    (lambda x: x.to(torch.complex64), TypeError, "student"),
])
def test_meta_sparse_complex_inputs_name_the_argument(make, error, name):
    student, teacher = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    with pytest.raises(error, match=name):
        facd_fast.contrastive_loss(make(student), make(teacher))


# ---------------------------------------------------------------- 7. the LR cache


def test_lr_cache_follows_the_content_not_the_clock(tmp_path):
    import os
    import time

    folder = write_images(tmp_path / "hr", 1, 32, seed=4)
    PairedFolderDataset(folder, 2, 16)
    cached = tmp_path / "hr_LR_bicubic" / "X2" / "img00.png"
    old = np.array(Image.open(cached))
    write_images(folder, 1, 32, seed=5)  # new content, then made to look older than the cache
    stamp = time.time() - 3600
    os.utime(folder / "img00.png", (stamp, stamp))
    PairedFolderDataset(folder, 2, 16)
    assert not np.array_equal(np.array(Image.open(cached)), old)


def test_demo_refuses_to_replace_an_earlier_demo_unasked(tmp_path, capsys):
    earlier = tmp_path / "demo" / "fd-l1" / "log.jsonl"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}\n")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    line = one_error_line(capsys)
    assert str(earlier) in line and "--overwrite" in line
    assert [p.name for p in (tmp_path / "demo").rglob("*")] == ["fd-l1", "log.jsonl"]


@pytest.mark.parametrize("backend", facd_fast.available_backends())
def test_masked_out_patch_gets_exactly_zero_gradient_even_from_nan(backend):
    student = torch.rand(3, 4, 3, 3)
    student[1] = float("nan")
    student.requires_grad_()
    teacher = torch.rand(3, 4, 3, 3)
    loss = facd_fast.contrastive_loss(student, teacher, mask=torch.tensor([True, False, True]), backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(student.grad[1], torch.zeros_like(student.grad[1]))
    assert torch.isfinite(student.grad).all() and student.grad[0].abs().sum() > 0
