"""``facd study`` results describe what they name: evaluations keyed by folder content, student and protocol;
run folders bound to their resolved config (issue 19, item 2)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from facd_fast.cli import main
from facd_fast.train.config import ConfigError, dump_config, load_config
from facd_fast.train.evaluate import evaluation_protocol
from facd_fast.train.study import Run, run_study
from facd_fast.train.study.records import (NOT_IDENTITY, config_differences, current_evaluations, file_sha256,
                                           folder_key)
from facd_fast.train.study.runner import prepare_runs

from train_fixtures import tiny_config, write_images

#: The fixture study: the tiny config with these --set values, one run.
SETS = ["train.lr=1e-3", "train.iterations=2"]
RUN_DIR = Path("runs") / "none" / "seed0"


def snapshot(folder: Path) -> dict:
    """{relative path: (content sha256, mtime_ns)} of every file below ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- what a run is: its resolved config ------------------------------------------------------------------
def test_config_differences_compare_values_not_spelling():
    config = load_config(None, ["train.lr=1e-2", "train.batch_size=8"])
    assert config_differences(config, load_config(None, ["train.batch_size=8", "train.lr=0.01"])) == []
    assert config_differences(config, load_config(None, ["train.batch_size=8", "train.lr=0.02"])) == [
        "train.lr recorded 0.01, now 0.02"]
    # The child's own folder and progress bar make no other run.
    assert {("run", "out_dir"), ("train", "progress")} <= NOT_IDENTITY
    assert config_differences(config, {**config, "run": {**config["run"], "out_dir": "elsewhere"}}) == []
    # A config recorded before a key existed: the same run while the key holds its default, another one otherwise.
    older = json.loads(json.dumps(config))
    del older["distill"]["lambda_warmup"]
    assert config_differences(older, config) == []
    assert config_differences(older, {**config, "distill": {**config["distill"], "lambda_warmup": 5}}) == [
        "distill.lambda_warmup recorded 0, now 5"]
    # ... except where the default is not what the older run did: its teacher ran in the student's precision.
    del older["distill"]["teacher_precision"]
    assert config_differences(older, config) == ['distill.teacher_precision recorded "fp32", now "auto"']
    older["distill"]["teacher_precision"] = "auto"
    # A recorded key that no longer exists is a difference, named.
    older["distill"]["temperature"] = 0.5
    assert config_differences(older, config) == ["distill.temperature recorded 0.5, now no such key"]


def test_prepare_runs_binds_a_folder_to_its_resolved_config(tmp_path):
    config_file = tiny_config(tmp_path)
    out = tmp_path / "study"
    run = Run("none", 0, {}, ["train.lr=1e-3", "train.batch_size=4", "distill.method=none", "run.seed=0"])
    evals = {"val": folder_key(tmp_path / "data" / "val")}
    (run_dir,) = prepare_runs([run], [load_config(config_file, run.overrides)], out, str(config_file), evals)
    spec_path = run_dir / "spec.json"
    before = snapshot(out)

    # The same values from other override order and spelling, or from a copy of the file: the same run, and
    # its spec keeps what it recorded (nothing is rewritten).
    copy = tmp_path / "copy.toml"
    shutil.copy(config_file, copy)
    reordered = Run("none", 0, {}, ["train.batch_size=4", "train.lr=0.001", "distill.method=none", "run.seed=0"])
    for file, same in ((config_file, run), (copy, reordered)):
        prepare_runs([same], [load_config(file, same.overrides)], out, str(file), evals)
        assert snapshot(out) == before
    spec = json.loads(spec_path.read_text())
    assert (spec["config"], spec["overrides"]) == (str(config_file), run.overrides)
    # Another folder content: only the evaluation folders of the spec follow.
    write_images(tmp_path / "data" / "val2", 1, 40, seed=5)
    other_evals = {"val": folder_key(tmp_path / "data" / "val2")}
    prepare_runs([reordered], [load_config(copy, reordered.overrides)], out, str(copy), other_evals)
    assert json.loads(spec_path.read_text()) == {**spec, "evals": other_evals}

    # An edited file: refused, naming the key and both values, and nothing written.
    edited = tmp_path / "edited.toml"
    edited.write_text(config_file.read_text().replace("patch_size = 16", "patch_size = 24"))
    written = snapshot(out)
    with pytest.raises(ConfigError) as error:
        prepare_runs([run], [load_config(edited, run.overrides)], out, str(edited), evals)
    assert str(error.value).startswith(f"{run_dir} holds a run of another config: data.patch_size recorded 16, now 24;")
    assert snapshot(out) == written


def test_a_spec_written_before_resolved_configs_is_resolved_the_same_way(tmp_path):
    config_file = tiny_config(tmp_path)
    out = tmp_path / "study"
    run = Run("none", 0, {}, ["train.batch_size=4", "train.lr=0.001", "distill.method=none", "run.seed=0"])
    run_dir = out / run.relative_dir()
    run_dir.mkdir(parents=True)
    # What facd study wrote before: the file, its sha256 and the overrides (here in another order and spelling).
    old = {"config": str(config_file), "config_sha256": file_sha256(config_file),
           "overrides": ["train.lr=1e-3", "train.batch_size=4", "distill.method=none", "run.seed=0"],
           "point": {}, "evals": {"val": str(tmp_path / "data" / "val")}}
    (run_dir / "spec.json").write_text(json.dumps(old))
    evals = {"val": folder_key(tmp_path / "data" / "val")}
    other = load_config(config_file, [*run.overrides, "train.lr=2e-3"])
    with pytest.raises(ConfigError, match=r"train.lr recorded 0.001, now 0.002; "):
        prepare_runs([run], [other], out, str(config_file), evals)
    assert json.loads((run_dir / "spec.json").read_text()) == old
    prepare_runs([run], [load_config(config_file, run.overrides)], out, str(config_file), evals)
    assert json.loads((run_dir / "spec.json").read_text())["resolved"] == load_config(config_file, run.overrides)

    # The file edited since (a comment: the same values): read back from the config the run trained with,
    # or refused, naming the file, when the run never trained.
    trained = dump_config(load_config(config_file, [*run.overrides, f"run.out_dir={run_dir}", "train.progress=false"]))
    (run_dir / "spec.json").write_text(json.dumps(old))
    config_file.write_text(config_file.read_text() + "# edited\n")
    with pytest.raises(ConfigError, match=f"names the config file {config_file}, which changed since .* never trained"):
        prepare_runs([run], [load_config(config_file, run.overrides)], out, str(config_file), evals)
    assert json.loads((run_dir / "spec.json").read_text()) == old
    (run_dir / "none").mkdir()
    (run_dir / "none" / "config.toml").write_text(trained)
    prepare_runs([run], [load_config(config_file, run.overrides)], out, str(config_file), evals)
    assert "resolved" in json.loads((run_dir / "spec.json").read_text())


# --- what an evaluation describes: folder content, student, protocol -------------------------------------
def test_folder_key_follows_names_and_content(tmp_path):
    folder = write_images(tmp_path / "val", 2, 40, seed=1)
    key = folder_key(folder)
    assert key["files"] == 2 and key == folder_key(folder)
    shutil.copytree(folder, tmp_path / "copy")
    assert folder_key(tmp_path / "copy")["folder_sha256"] == key["folder_sha256"]  # the content, not the place
    (folder / ".DS_Store").write_bytes(b"x")  # hidden files are not read as images
    assert folder_key(folder)["folder_sha256"] == key["folder_sha256"]
    changes = []
    (folder / "img00.png").rename(folder / "renamed.png")
    changes.append(folder_key(folder))
    image = Image.open(folder / "renamed.png")
    image.putpixel((0, 0), (0, 0, 0) if image.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    image.save(folder / "renamed.png")
    changes.append(folder_key(folder))
    (folder / "renamed.png").unlink()
    changes.append(folder_key(folder))
    assert len({key["folder_sha256"], *(c["folder_sha256"] for c in changes)}) == 4
    assert [c["files"] for c in changes] == [2, 2, 1]


def test_an_evaluation_is_current_only_for_its_folder_student_and_protocol(tmp_path):
    folder = folder_key(write_images(tmp_path / "val", 2, 40, seed=1))
    student = tmp_path / "student.pth"
    student.write_bytes(b"weights")
    key = {"folder_sha256": folder["folder_sha256"], "checkpoint_sha256": file_sha256(student),
           "protocol": evaluation_protocol(2)}
    result = {"evals": {"val": {"key": key, "mean_psnr_y": 30.0}, "old": {"mean_psnr_y": 31.0}}}
    evals = {"val": folder, "old": folder}
    assert list(current_evaluations(result, student, evals, 2)) == ["val"]  # "old" has no key: stale
    assert current_evaluations(result, student, evals, 3) == {}  # another scale: another protocol
    assert current_evaluations(result, tmp_path / "missing.pth", evals, 2) == {}
    student.write_bytes(b"other weights")
    assert current_evaluations(result, student, evals, 2) == {}


# --- a tiny study, rerun ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A finished study of one 2-step run (the student alone, seed 0), evaluated on 2 photos."""
    tmp = tmp_path_factory.mktemp("study_records")
    config = tiny_config(tmp)
    out = tmp / "study"
    run_study(str(config), methods=["none"], seeds=[0], sets=SETS, out=out, progress=False)
    return {"tmp": tmp, "config": config, "out": out}


def copy_study(finished_study, tmp_path) -> Path:
    out = tmp_path / "study"
    shutil.copytree(finished_study["out"], out)  # copy2: contents and modification times
    return out


def test_an_unchanged_rerun_trains_and_evaluates_nothing_whatever_the_set_order(finished_study, tmp_path):
    out = copy_study(finished_study, tmp_path)
    before = {k: v for k, v in snapshot(out).items() if k.startswith("runs")}
    said = []
    for sets in (SETS, SETS[::-1], ["train.iterations=2", "train.lr=0.001"]):
        study = run_study(str(finished_study["config"]), methods=["none"], seeds=[0], sets=sets, out=out,
                          progress=False, echo=said.append)
        assert {k: v for k, v in snapshot(out).items() if k.startswith("runs")} == before
        assert study["finished"] == 1 and len(study["rows"]) == 1
    assert all("(1 already done)" in line for line in said), said


def test_a_photo_added_to_the_eval_folder_reevaluates_the_finished_run(finished_study, tmp_path):
    out = copy_study(finished_study, tmp_path)
    val = tmp_path / "val"
    shutil.copytree(finished_study["tmp"] / "data" / "val", val)
    run_dir = out / RUN_DIR
    old_result = json.loads((run_dir / "result.json").read_text())
    trained = {p: p.stat().st_mtime_ns for p in (run_dir / "none").rglob("*") if p.is_file()}
    arguments = dict(methods=["none"], seeds=[0], sets=SETS, out=out, progress=False, eval_dirs=[f"val={val}"])
    said = []
    run_study(str(finished_study["config"]), echo=said.append, **arguments)  # a copy of the folder: reused
    assert "(1 already done)" in said[0]

    write_images(tmp_path / "extra", 1, 48, seed=7)
    shutil.copy(tmp_path / "extra" / "img00.png", val / "img99.png")
    said = []
    study = run_study(str(finished_study["config"]), echo=said.append, **arguments)
    assert "(0 already done, 1 to evaluate again)" in said[0]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"] == old_result["train"]  # evaluated again, not trained again
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    evaluation = result["evals"]["val"]
    key = folder_key(val)
    assert key["files"] == 3 and key["folder_sha256"] != old_result["evals"]["val"]["key"]["folder_sha256"]
    assert evaluation["key"]["folder_sha256"] == key["folder_sha256"]
    assert evaluation["key"]["checkpoint_sha256"] == file_sha256(run_dir / "none" / "none.pth")
    assert [i["name"] for i in evaluation["images"]] == ["img00", "img01", "img99"]
    assert evaluation["images"][:2] == old_result["evals"]["val"]["images"]
    # study.json describes the folder it names: its key, and rows of the new numbers.
    written = json.loads((out / "study.json").read_text())
    assert written["rows"] == study["rows"]
    assert {k: written["evals"]["val"][k] for k in ("dir", "folder_sha256", "files")} == key
    (row,) = written["rows"]
    assert row["folder_sha256"] == key["folder_sha256"]
    assert row["mean_psnr_y"] == pytest.approx(sum(i["psnr_y"] for i in evaluation["images"]) / 3)
    assert row["mean_psnr_y"] != pytest.approx(old_result["evals"]["val"]["mean_psnr_y"])
    assert f"3 files, sha256 {key['folder_sha256'][:12]}" in (out / "study.md").read_text()


def test_an_edited_config_file_is_refused_naming_the_key_and_nothing_changes(finished_study, tmp_path, capsys):
    out = copy_study(finished_study, tmp_path)
    edited = tmp_path / "edited.toml"
    edited.write_text(finished_study["config"].read_text().replace("lr = 0.0002", "lr = 0.0002\nlr_gamma = 0.25"))
    before = snapshot(out)
    status = main(["study", str(edited), "--methods", "none", "--seeds", "0", "--out", str(out),
                   *(f"--set={text}" for text in SETS)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip() == (f"facd: error: {out / RUN_DIR} holds a run of another config: train.lr_gamma recorded 0.5, "
                           f"now 0.25; use another --out, or the config and --set values it was made with")
    assert snapshot(out) == before
