"""The ``facd`` command: eval --json, export and re-import, and one-line errors for what the user got wrong."""
import json

import numpy as np
import pytest
import torch

from facd_fast import data, metrics, models
from facd_fast.cli import main
from facd_fast.train.training_state import load_training_state
from train_fixtures import run_facd, tiny_config



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step facd run: its config, run folder and trainer checkpoint."""
    tmp_path = tmp_path_factory.mktemp("cli")
    # In-process runs: no deterministic mode, which would leak into later test files.
    config = tiny_config(tmp_path, run={"deterministic": False})
    assert main(["distill", str(config)]) == 0
    run = tmp_path / "run" / "facd"
    return {"config": config, "tmp": tmp_path, "run": run, "checkpoint": run / "checkpoints" / "last.pt"}


def test_distill_writes_log_checkpoint_and_export(trained_run):
    assert not torch.are_deterministic_algorithms_enabled()
    run = trained_run["run"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "l1_hr", "l1_teacher", "feature", "distilled_fraction", "psnr_gap_db", "lr", "it_s"):
        assert all(np.isfinite(r[name]) for r in train), name
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 6]
    assert records[-1]["kind"] == "end" and records[-1]["steps"] == 6
    assert (run / "facd.pth").is_file() and (run / "config.toml").is_file()


def test_eval_json_reports_the_protocol_per_image(trained_run, capsys):
    export = trained_run["run"] / "facd.pth"
    val_dir = trained_run["tmp"] / "data" / "val"
    assert main(["eval", str(export), "--hr-dir", str(val_dir), "--scale", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"mean_psnr_y", "mean_ssim_y", "images", "self_ensemble", "tile", "tile_overlap", "skipped"}
    assert result["self_ensemble"] is False and result["tile"] is None and result["tile_overlap"] is None
    assert result["skipped"] == []
    assert [image["name"] for image in result["images"]] == ["img00", "img01"]
    assert result["mean_psnr_y"] == pytest.approx(np.mean([i["psnr_y"] for i in result["images"]]))
    assert result["mean_ssim_y"] == pytest.approx(np.mean([i["ssim_y"] for i in result["images"]]))
    # Recompute the first image by hand: HR cropped to the scale, LR by MATLAB bicubic, uint8, Y, border 2.
    network = models.model_from_checkpoint(export).eval()
    name, lr, hr = data.BenchmarkFolder(val_dir, 2)[0]
    with torch.no_grad():
        sr = network(lr[None])[0]
    sr_uint8, hr_uint8 = metrics.to_uint8_image(sr), metrics.to_uint8_image(hr)
    assert result["images"][0]["psnr_y"] == pytest.approx(metrics.psnr_y(sr_uint8, hr_uint8, 2), abs=1e-9)
    assert result["images"][0]["ssim_y"] == pytest.approx(metrics.ssim_y(sr_uint8, hr_uint8, 2), abs=1e-9)


def test_eval_accepts_a_trainer_checkpoint_and_a_foreign_file(trained_run, capsys, tmp_path):
    val_dir = trained_run["tmp"] / "data" / "val"
    assert main(["eval", str(trained_run["checkpoint"]), "--hr-dir", str(val_dir), "--scale", "2", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    # The same weights as a bare BasicSR state dict, with EDSR's architecture inferred from the keys.
    foreign = tmp_path / "foreign.pth"
    torch.save({"params": load_training_state(trained_run["checkpoint"])["model"]}, foreign)
    assert main(["eval", str(foreign), "--hr-dir", str(val_dir), "--scale", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ours


def test_export_then_reimport_gives_the_student_without_dr(trained_run, tmp_path):
    out = tmp_path / "student.pth"
    assert main(["export", str(trained_run["checkpoint"]), str(out)]) == 0
    state = load_training_state(trained_run["checkpoint"])
    file = torch.load(out, map_location="cpu", weights_only=True)
    assert set(file) == {"params", "facd_fast"}
    assert file["params"].keys() == state["model"].keys()
    assert not any("adapter" in key for key in file["params"])
    network = models.model_from_checkpoint(out)
    assert network.preset == "edsr-demo-student" and network.scale == 2
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, state["model"][name])


def test_missing_config_is_a_one_line_error(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "missing.toml")]) == 2
    assert "facd: error: config file" in capsys.readouterr().err


def test_bad_override_key_is_a_one_line_error(trained_run, capsys):
    assert main(["distill", str(trained_run["config"]), "--set", "train.batchsize=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.batchsize" in err and "batch_size" in err


def test_missing_data_folder_is_a_one_line_error(trained_run, tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    assert main(["distill", str(trained_run["config"]), "--set", f"data.train_hr_dir={missing}",
                 "--set", f"run.out_dir={tmp_path / 'run'}"]) == 2
    assert f"data.train_hr_dir: folder {str(missing)!r} does not exist" in capsys.readouterr().err
    assert main(["eval", str(trained_run["checkpoint"]), "--hr-dir", str(missing), "--scale", "2"]) == 2
    assert "--hr-dir: folder" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_architecture_is_a_one_line_error(trained_run, capsys):
    val_dir = trained_run["tmp"] / "data" / "val"
    export = trained_run["run"] / "facd.pth"
    assert main(["eval", str(export), "--hr-dir", str(val_dir), "--scale", "2", "--model", "rcan-student"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"facd: error: checkpoint {export} does not fit RCAN") and "missing" in err
    assert main(["eval", str(export), "--hr-dir", str(val_dir), "--scale", "4"]) == 2
    assert "scale" in capsys.readouterr().err


def test_teacher_of_the_wrong_architecture_stops_distillation(trained_run, tmp_path, capsys):
    wrong = tmp_path / "rcan.pth"
    models.save_checkpoint_basicsr(models.build("rcan-student", 4), wrong)
    assert main(["distill", str(trained_run["config"]), "--set", f"model.teacher_checkpoint={wrong}",
                 "--set", f"run.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"facd: error: model.teacher_checkpoint {str(wrong)!r} does not fit model.teacher = "
                          f"'edsr-demo-teacher' at model.scale = 2")
    assert f"checkpoint {wrong} does not fit EDSR: missing keys" in err


def test_python_dash_m_runs_the_same_command():
    result = run_facd("--help")
    assert result.returncode == 0
    for command in ("train-teacher", "distill", "eval", "export", "bench", "demo"):
        assert command in result.stdout


def test_train_teacher_exports_the_teacher_preset(trained_run):
    out_dir = trained_run["tmp"] / "teacher_run"
    assert main(["train-teacher", str(trained_run["config"]), "--set", f"run.out_dir={out_dir}",
                 "--set", "train.iterations=2", "--set", "train.val_every=2"]) == 0
    teacher = models.model_from_checkpoint(out_dir / "teacher" / "teacher.pth")
    assert teacher.preset == "edsr-demo-teacher" and teacher.scale == 2
    records = [json.loads(line) for line in (out_dir / "teacher" / "log.jsonl").read_text().splitlines()]
    assert {"l1_teacher", "feature"}.isdisjoint(records[0]) and records[-1]["method"] == "none"


@pytest.mark.parametrize("method", ["fd-l2", "fakd", "facd-nomask"])
def test_bf16_channels_last_distillation_runs_every_baseline(trained_run, method):
    out_dir = trained_run["tmp"] / f"bf16_{method}"
    assert main(["distill", str(trained_run["config"]), "--method", method, "--set", f"run.out_dir={out_dir}",
                 "--set", "train.amp=bf16", "--set", "train.channels_last=true", "--set", "train.iterations=2",
                 "--set", "train.val_every=2", "--set", "train.ema_decay=0.5"]) == 0
    records = [json.loads(line) for line in (out_dir / method / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert np.isfinite(records[-1]["val_psnr_y"])


def test_bench_runs_the_kernel_benchmark_then_the_training_step(monkeypatch, tmp_path):
    from facd_fast.bench import kernels, train_step

    calls = []
    monkeypatch.setattr(kernels, "run", lambda **kwargs: calls.append(("kernels", kwargs)))
    monkeypatch.setattr(train_step, "run", lambda **kwargs: calls.append(("train_step", kwargs)))
    assert main(["bench", "--out", str(tmp_path), "--steps", "1", "--rounds", "2", "--device", "cpu",
                 "--variant", "bf16=train.amp=bf16", "--methods", "none,facd", "--set", "train.batch_size=4"]) == 0
    assert calls[0] == ("kernels", {"out_dir": str(tmp_path), "device": "cpu"})
    assert calls[1] == ("train_step", {"out_dir": str(tmp_path), "setting": None, "methods": ["none", "facd"],
                                       "variants": {"bf16": ["train.amp=bf16"]}, "steps": 1, "rounds": 2,
                                       "device": "cpu", "sets": ["train.batch_size=4"]})