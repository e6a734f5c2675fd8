"""--resume keeps a run's record true: what may change, what is refused, and what --resume-with-changes records."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from facd_fast.cli import main
from facd_fast.train.config import load_config
from facd_fast.train.resume import check_resume, recorded_config
from facd_fast.train.training_state import load_training_state
from train_fixtures import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A facd run of 3 steps (checkpoint at 3), and a teacher run of 3 steps."""
    tmp = tmp_path_factory.mktemp("resume")
    config = tiny_config(tmp, run={"deterministic": False}, train={"iterations": 3, "lr": 5e-4})
    assert main(["distill", str(config)]) == 0
    assert main(["train-teacher", str(config)]) == 0
    return {"tmp": tmp, "config": config}


def _copy(three_steps, tmp_path: Path, stage: str = "facd") -> Path:
    shutil.copytree(three_steps["tmp"] / "run" / stage, tmp_path / "run" / stage)
    return tmp_path / "run"


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(run: Path, kind: str):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("facd: error: ") and "Traceback" not in err, err
    return lines[0]


def test_resume_may_extend_a_run_and_logs_the_change_with_its_step(three_steps, tmp_path):
    root = _copy(three_steps, tmp_path)
    assert main(["distill", str(three_steps["config"]), "--resume", "--set", f"run.out_dir={root}",
                 "--set", "train.iterations=5", "--set", "train.log_every=2"]) == 0
    run = root / "facd"
    (resume,) = _records(run, "resume")
    assert resume["step"] == 3
    changed = {c["key"]: c for c in resume["changes"]}
    assert changed["train.iterations"] == {"key": "train.iterations", "recorded": 3, "now": 5, "from_step": 4,
                                           "safe": True}
    assert changed["train.log_every"]["recorded"] == 1 and changed["train.log_every"]["now"] == 2
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3, 4, 5]
    text = (run / "config.toml").read_text()
    assert "#   from step 4: train.iterations = 5 (before: 3)" in text
    assert load_config(run / "config.toml")["train"]["iterations"] == 5  # still a config the command reads
    assert load_training_state(run / "checkpoints" / "last.pt")["config_history"][0]["key"] in changed


def test_resume_refuses_other_settings_naming_each_and_writes_nothing(three_steps, tmp_path, capsys):
    root = _copy(three_steps, tmp_path)
    before = _digests(root)
    assert main(["distill", str(three_steps["config"]), "--resume", "--set", f"run.out_dir={root}",
                 "--set", "train.iterations=6", "--set", "train.lr=1e-2", "--set", "distill.lambda=0.5"]) == 2
    line = _error(capsys)
    assert "train.lr recorded 0.0005, now 0.01" in line and "distill.lambda recorded 1.0, now 0.5" in line
    assert "trained to step 3" in line and "--resume-with-changes" in line and "train.iterations" not in line
    assert _digests(root) == before


def test_resume_with_changes_applies_them_from_the_next_step_and_records_them(three_steps, tmp_path):
    root = _copy(three_steps, tmp_path)
    assert main(["distill", str(three_steps["config"]), "--resume-with-changes", "--set", f"run.out_dir={root}",
                 "--set", "train.iterations=5", "--set", "train.lr=1e-2", "--set", "distill.lambda=0.5"]) == 0
    run = root / "facd"
    train = _records(run, "train")
    assert [r["lr"] for r in train] == pytest.approx([5e-4] * 3 + [1e-2] * 2)  # the new lr really applies
    assert [r["lambda"] for r in train] == pytest.approx([1.0] * 3 + [0.5] * 2)
    (resume,) = _records(run, "resume")
    refused_before = {c["key"]: (c["recorded"], c["now"], c["from_step"], c["safe"]) for c in resume["changes"]}
    assert refused_before["train.lr"] == (5e-4, 1e-2, 4, False)
    assert refused_before["distill.lambda"] == (1.0, 0.5, 4, False)
    text = (run / "config.toml").read_text()
    assert "#   from step 4: train.lr = 0.01 (before: 0.0005) [--resume-with-changes]" in text
    # a second resume keeps the history and compares with the settings now in effect
    assert main(["distill", str(three_steps["config"]), "--resume", "--set", f"run.out_dir={root}",
                 "--set", "train.iterations=6", "--set", "train.lr=1e-2", "--set", "distill.lambda=0.5"]) == 0
    history = load_training_state(run / "checkpoints" / "last.pt")["config_history"]
    assert [c["key"] for c in history].count("train.lr") == 1 and history[-1]["key"] == "train.iterations"


@pytest.mark.parametrize("flag", ["--resume", "--resume-with-changes"])
def test_an_architecture_change_is_always_refused_naming_the_key(three_steps, tmp_path, capsys, flag):
    root = _copy(three_steps, tmp_path)
    before = _digests(root)
    assert main(["distill", str(three_steps["config"]), flag, "--set", f"run.out_dir={root}",
                 "--set", "model.student=edsr-student"]) == 2
    line = _error(capsys)
    assert "model.student recorded 'edsr-demo-student', now 'edsr-student'" in line and "another network" in line
    assert _digests(root) == before


def test_a_teacher_run_refuses_another_seed(three_steps, tmp_path, capsys):
    root = _copy(three_steps, tmp_path, stage="teacher")
    before = _digests(root)
    assert main(["train-teacher", str(three_steps["config"]), "--resume", "--set", f"run.out_dir={root}",
                 "--set", "run.seed=7"]) == 2
    assert "run.seed recorded 3, now 7" in _error(capsys)
    assert _digests(root) == before
    # the distill section does not concern a teacher run: changing it is no change
    assert main(["train-teacher", str(three_steps["config"]), "--resume", "--set", f"run.out_dir={root}",
                 "--set", "distill.lambda=0.2", "--set", "train.iterations=4"]) == 0


def test_a_record_without_teacher_precision_ran_the_teacher_in_the_students_precision():
    config = load_config(None)
    old = {section: dict(values) for section, values in config.items()}
    del old["distill"]["teacher_precision"]
    assert recorded_config(old)["distill"]["teacher_precision"] == "fp32"
    old["train"]["amp"] = "bf16"
    assert recorded_config(old)["distill"]["teacher_precision"] == "bf16"
    # an "auto" that resolves to another precision on this machine is a change too
    with pytest.raises(ValueError, match=r"teacher_precision \(resolved\) recorded 'bf16', now 'fp32'"):
        check_resume(config, config, "distill", False, "last.pt", 10, precision=("bf16", "fp32"))
