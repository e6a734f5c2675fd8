"""The last tracebacks and raw errno texts of the "run records" issue, by command: one line, exit 2, nothing lost.

Each case asserts the exit status, the one ``facd: error:`` line naming the
argument or path, and that what was already written is unchanged.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facd_fast import models
from facd_fast.cli import main
from train_fixtures import tiny_config, write_images


def _one_line(capsys, argv, status: int = 2) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("facd: error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "[Errno" not in err, err
    return lines[0]


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def network_file(tmp_path):
    torch.manual_seed(0)
    return models.save_checkpoint_basicsr(models.build("edsr-demo-student", 2, num_block=1, num_feat=8),
                                          tmp_path / "tiny.pth")


def _photos(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


# --- facd bench -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--device", "cuda"], "--device='cuda': this machine or torch build has no cuda device"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--rounds", "-1"], "--rounds must be >= 1, got -1"),
    (["--methods", "none,fitnet"], "--methods: unknown method(s) ['fitnet']"),
    (["--variant", "x=train.lr=fast"], "train.lr must be of type float"),
    (["--set", "train.bach_size=2"], "unknown key train.bach_size"),
])
def test_bench_refuses_bad_options_before_it_starts(capsys, tmp_path, args, expected):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = _one_line(capsys, ["bench", "--out", str(tmp_path / "results"), "--skip-kernels", *args])
    assert expected in line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_bench_out_naming_a_file_fails_first_and_leaves_the_file(capsys, tmp_path, monkeypatch):
    from facd_fast.bench import train_step

    monkeypatch.setattr(train_step, "run", lambda **kwargs: pytest.fail("the benchmark ran"))
    target = tmp_path / "results.csv"
    target.write_text("mine")
    assert f"--out {str(target)!r} is a file" in _one_line(capsys, ["bench", "--out", str(target), "--skip-kernels"])
    assert target.read_text() == "mine"


# --- facd upscale -----------------------------------------------------------------------------------------
def test_upscale_stopped_by_a_bad_image_says_what_it_wrote_and_finishes_with_skip_existing(network_file, tmp_path,
                                                                                            capsys):
    folder = _photos(tmp_path / "in")
    (folder / "p2.png").write_bytes((folder / "p2.png").read_bytes()[:60])  # truncated, third in name order
    out = tmp_path / "out"
    line = _one_line(capsys, ["upscale", str(network_file), str(folder), "--out", str(out)])
    assert "cannot read image" in line and "p2.png" in line and "wrote 2 output(s) before it (p0.png, p1.png)" in line
    assert "--skip-existing" in line
    written = _digests(out)
    assert sorted(written) == ["p0.png", "p1.png"]
    # the same command again refuses to clobber them; --skip-existing keeps them, --skip-unreadable passes the bad one
    assert "p0.png' exists" in _one_line(capsys, ["upscale", str(network_file), str(folder), "--out", str(out)])
    assert main(["upscale", str(network_file), str(folder), "--out", str(out), "--skip-existing",
                 "--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 image(s)" in captured.out and "kept 2 existing" in captured.out and "skipped 1 unreadable" in captured.out
    assert "skipped unreadable image" in captured.err and "p2.png" in captured.err
    after = _digests(out)
    assert sorted(after) == ["p0.png", "p1.png", "p3.png"] and all(after[k] == v for k, v in written.items())
    assert "contradict" in _one_line(capsys, ["upscale", str(network_file), str(folder), "--out", str(out),
                                              "--skip-existing", "--overwrite"])


def test_upscale_onto_a_folder_or_a_read_only_folder_names_the_path_without_errno(network_file, tmp_path, capsys):
    folder = _photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    (out / "p0.png").mkdir(parents=True)
    line = _one_line(capsys, ["upscale", str(network_file), str(folder), "--out", str(out), "--overwrite"])
    assert f"output {str(out / 'p0.png')!r} is a folder" in line and ".tmp" not in line
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = _one_line(capsys, ["upscale", str(network_file), str(folder), "--out", str(locked)])
        assert f"the folder {str(locked)!r} is not writable" in line and ".tmp" not in line
    finally:
        locked.chmod(stat.S_IRWXU)


def test_atomic_write_errors_name_the_target_not_the_temporary(tmp_path):
    from facd_fast.atomic_files import atomic_write
    from facd_fast.cli import _message

    target = tmp_path / "a.png"
    target.mkdir()
    with pytest.raises(OSError) as caught:
        atomic_write(target, lambda file: file.write(b"x"))
    assert _message(caught.value) == f"cannot write {target}: it is a folder"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_upscale_says_how_to_finish_not_resume(network_file, tmp_path, capsys, monkeypatch):
    from facd_fast.deploy import upscale

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(upscale, "super_resolve", interrupt)
    assert main(["upscale", str(network_file), str(_photos(tmp_path / "in", 1)), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "--skip-existing" in err and "--resume" not in err


# --- facd eval --------------------------------------------------------------------------------------------
def test_eval_hr_dir_naming_a_file_says_so(network_file, tmp_path, capsys):
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    line = _one_line(capsys, ["eval", str(network_file), "--hr-dir", str(photo), "--scale", "2"])
    assert f"--hr-dir: {str(photo)!r} is a file; give the folder that holds the images" in line
    line = _one_line(capsys, ["eval", str(network_file), "--hr-dir", str(tmp_path / "in"), "--lr-dir", str(photo),
                              "--scale", "2"])
    assert "--lr-dir" in line and "is a file" in line


# --- facd distill -----------------------------------------------------------------------------------------
def test_a_teacher_of_another_scale_is_named_by_model_scale(tmp_path, capsys):
    config = tiny_config(tmp_path, run={"deterministic": False})
    line = _one_line(capsys, ["distill", str(config), "--set", "model.scale=4", "--set", "data.patch_size=16",
                              "--set", f"run.out_dir={tmp_path / 'run'}"])
    assert "does not fit model.teacher = 'edsr-demo-teacher' at model.scale = 4" in line
    assert not (tmp_path / "run").exists()


def test_train_data_naming_a_file_says_so(tmp_path, capsys):
    photo = write_images(tmp_path / "imgs", 1, 24, seed=0) / "img00.png"
    config = tiny_config(tmp_path, run={"deterministic": False})
    line = _one_line(capsys, ["distill", str(config), "--set", f"data.train_hr_dir={photo}",
                              "--set", f"run.out_dir={tmp_path / 'run'}"])
    assert f"data.train_hr_dir: {str(photo)!r} is a file" in line


# --- found by probing every command -----------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["eval", "x.pth", "--hr-dir", "d", "--scale", "abc"], "facd: error: eval: argument --scale: invalid int value: 'abc'"),
    (["nope"], "facd: error: argument COMMAND: invalid choice: 'nope'"),
    (["distill"], "facd: error: distill: the following arguments are required: config"),
])
def test_usage_errors_are_one_line_too(capsys, argv, expected):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 and "usage:" not in err


def test_model_naming_an_unknown_preset_says_what_it_may_name(network_file, tmp_path, capsys):
    line = _one_line(capsys, ["eval", str(network_file), "--hr-dir", str(_photos(tmp_path / "in", 1)), "--scale", "2",
                              "--model", "nope"])
    assert line == (f"facd: error: checkpoint {network_file}: --model: unknown preset 'nope'; presets are "
                    f"{sorted(models.PRESETS)}, or name your own network as \"package.module:function\"")


def test_export_to_a_path_ending_in_a_slash_is_refused(network_file, tmp_path, capsys):
    target = tmp_path / "newdir"
    assert "is a folder" in _one_line(capsys, ["export", str(network_file), f"{target}/", "--overwrite"])
    assert not target.exists()


def test_study_eval_dir_naming_a_file_and_demo_jobs_are_checked_first(tmp_path, capsys):
    photo = _photos(tmp_path / "in", 1) / "p0.png"
    config = tiny_config(tmp_path, run={"deterministic": False})
    line = _one_line(capsys, ["study", str(config), "--eval-dir", str(photo), "--out", str(tmp_path / "s")])
    assert f"--eval-dir: {str(photo)!r} is a file" in line
    assert "--jobs must be >= 1, got 0" in _one_line(capsys, ["demo", "--jobs", "0", "--out", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()
