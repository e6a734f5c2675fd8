"""Package data: shipped configs by name, ``package:`` paths, ``facd configs`` and ``facd --version``."""
import hashlib
import importlib.metadata
import json

import pytest

import facd_fast
from facd_fast import models, resources
from facd_fast.cli import main
from facd_fast.train.config import load_config
from train_fixtures import write_images

SHIPPED = ("demo", "demo-teacher", "edsr_x2", "edsr_x3", "edsr_x4", "rcan_x2", "rcan_x3", "rcan_x4")
DEMO_TEACHER = "package:checkpoints/edsr-demo-teacher-x2.pth"


def test_shipped_configs_are_package_data():
    configs = resources.shipped_configs()
    assert tuple(configs) == SHIPPED
    for name, path in configs.items():
        assert path.is_file() and path.parent == resources.package_root() / "configs", name


def test_a_name_is_a_shipped_config_unless_a_file_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resources.config_path("edsr_x4") == resources.shipped_configs()["edsr_x4"]
    assert resources.config_path("edsr_x4.toml") == resources.shipped_configs()["edsr_x4"]
    (tmp_path / "edsr_x4.toml").write_text("[model]\nscale = 3\n")
    assert resources.config_path("edsr_x4.toml").resolve() == tmp_path / "edsr_x4.toml"
    assert load_config("edsr_x4.toml")["model"]["scale"] == 3
    assert load_config("edsr_x4")["model"]["scale"] == 4


@pytest.mark.parametrize("argument", ["edsr_x9", "sub/edsr_x4", "sub/edsr_x4.toml"])
def test_an_unknown_config_names_the_argument_and_the_shipped_names(tmp_path, monkeypatch, argument):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"config file '{argument}' does not exist, and it is not the name "
                                                r"of a shipped config \(demo, demo-teacher, edsr_x2"):
        load_config(argument)
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(FileNotFoundError, match="config file 'folder.toml' is not a file"):
        load_config("folder.toml")


def test_package_paths_resolve_inside_the_package_and_user_paths_stay_as_given(tmp_path):
    assert resources.resolve_path(DEMO_TEACHER) == resources.package_root() / "checkpoints" / "edsr-demo-teacher-x2.pth"
    assert str(resources.resolve_path("runs/x/teacher.pth")) == "runs/x/teacher.pth"
    assert resources.resolve_path(tmp_path / "t.pth") == tmp_path / "t.pth"
    for bad in ("package:", "package:../setup.py", "package:checkpoints/../../x"):
        with pytest.raises(ValueError, match="a package: path names a file inside facd_fast"):
            resources.resolve_path(bad)


def test_the_demo_config_points_at_the_shipped_teacher_and_its_record():
    setting = load_config("demo")["model"]["teacher_checkpoint"]
    assert setting == DEMO_TEACHER
    path = resources.resolve_path(setting)
    record = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    teacher = models.model_from_checkpoint(path)
    assert (teacher.preset, teacher.scale) == (record["preset"], record["scale"]) == ("edsr-demo-teacher", 2)


def test_a_missing_package_teacher_is_an_error_naming_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "photos", count=1, size=48, seed=0)
    # run.threads=0: this in-process run leaves torch's thread count alone for later tests.
    assert main(["distill", "demo", "--set", "model.teacher_checkpoint=package:checkpoints/none.pth", "--set",
                 "run.threads=0", "--set", "data.train_hr_dir=photos", "--set", "data.val_hr_dir=photos"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("facd: error: model.teacher_checkpoint: file 'package:checkpoints/none.pth' does not exist")
    assert str(resources.package_root() / "checkpoints" / "none.pth") in error


def test_version_has_one_source(capsys):
    assert importlib.metadata.version("facd-fast") == facd_fast.__version__
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"facd {facd_fast.__version__} from {resources.package_root()} (torch ")


def test_configs_lists_each_shipped_config_and_prints_one(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[: len(SHIPPED)]] == list(SHIPPED)
    assert lines[SHIPPED.index("edsr_x4")].endswith("FACD paper setting, EDSR x4 (networks: docs/models.md; objective: docs/loss.md).")
    assert main(["configs", "edsr_x4"]) == 0
    assert capsys.readouterr().out == resources.shipped_configs()["edsr_x4"].read_text()
    assert main(["configs", "edsr_x9"]) == 2
    assert "facd: error: no shipped config named 'edsr_x9'; shipped: demo, demo-teacher" in capsys.readouterr().err
