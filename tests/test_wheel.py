"""The package as users get it: sdist -> wheel -> a fresh virtual environment, used from a folder outside the checkout.

The sdist is built with setuptools' PEP 517 hook (what ``python -m build --sdist
--no-isolation`` calls) from a copy of the checkout, and the wheel from that
sdist with ``pip wheel --no-build-isolation`` against the installed torch, so
the sdist alone must be enough to compile the C++ extension (about a minute
on two cores). The fresh environment reuses the running interpreter's
site-packages through a ``.pth`` file (torch, numpy, Pillow, triton ...:
nothing is downloaded) and gets the wheel with ``pip install --no-deps
--no-index``; every command then runs from a temporary folder, so nothing
from the checkout can be picked up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import facd_fast

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Build outputs and local state of a checkout: not sources, never copied into the build.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "datasets", "*.egg-info", "__pycache__",
                                     "*.so", ".pytest_cache", ".benchmarks")
SHIPPED_CONFIGS = ("demo", "demo-teacher", "edsr_x2", "edsr_x3", "edsr_x4", "rcan_x2", "rcan_x3", "rcan_x4")
DEMO_TEACHER = "facd_fast/checkpoints/edsr-demo-teacher-x2.pth"
PACKAGE_TEACHER = "package:checkpoints/edsr-demo-teacher-x2.pth"
#: A few steps of a shipped config on the built-in photos, validated on one small crop.
QUICK = ["--set", "train.iterations=2", "--set", "train.val_every=2", "--set", "train.checkpoint_every=2",
         "--set", "train.log_every=1", "--set", "train.batch_size=2", "--set", "train.progress=false",
         "--set", "train.plots=false", "--set", "data.num_workers=0", "--set", "data.val_max_images=1",
         "--set", "data.val_crop=48"]


def _run(command, cwd: Path, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _build_env() -> dict:
    # ninja (a pip package) lives beside the interpreter, which need not be on PATH.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """{"sdist": Path, "wheel": Path}, built from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("dist")
    source, out = tmp / "source", tmp / "dist"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist_name = _run([sys.executable, "-c", hook, out], cwd=source, env=_build_env()).stdout.strip().splitlines()[-1]
    sdist = out / sdist_name
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
          "-w", out, sdist], cwd=tmp, env=_build_env())
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return {"sdist": sdist, "wheel": wheels[0]}


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """A fresh virtual environment with the wheel installed: its bin folder, site-packages and a clean env."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    # The running interpreter's site folders, plain paths in a .pth: their own .pth files (an
    # editable install of the checkout among them) are not processed, and the wheel comes first.
    reused = [path for path in sys.path if Path(path).name in ("site-packages", "dist-packages") and Path(path).is_dir()]
    (purelib / "facd_test_reuse_site_packages.pth").write_text("\n".join(reused) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
          "--no-cache-dir", dist["wheel"]], cwd=tmp)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "FACD_BACKEND", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    work = tmp / "elsewhere"
    work.mkdir()
    assert REPO_ROOT not in work.resolve().parents
    return {"bin": venv / "bin", "purelib": purelib, "env": env, "work": work}


def test_sdist_holds_the_sources_and_the_package_data(dist):
    with tarfile.open(dist["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "csrc/facd_build.py", "csrc/facd_cpu.cpp",
                     "csrc/facd_cpu.h", "csrc/facd_kernels.h", "kernels/contrastive.py", "kernels/patch_mse.py",
                     DEMO_TEACHER, "facd_fast/resources.py", "tests/test_wheel.py"):
        assert required in names, required
    assert {f"facd_fast/configs/{name}.toml" for name in SHIPPED_CONFIGS} <= names
    assert not [name for name in names if name.endswith(".so") or "__pycache__" in name]


def test_wheel_holds_the_extension_kernels_configs_and_teacher(dist):
    with zipfile.ZipFile(dist["wheel"]) as archive:
        names = set(archive.namelist())
    assert [name for name in names if name.startswith("facd_fast/_C.") and name.endswith(".so")]
    for required in ("facd_fast/kernels/contrastive.py", "facd_fast/kernels/patch_mse.py", DEMO_TEACHER,
                     "facd_fast/checkpoints/edsr-demo-teacher-x2.json", "facd_fast/csrc/facd_cpu.cpp",
                     "facd_fast/csrc/facd_kernels.h", "facd_fast/csrc/facd_build.py"):
        assert required in names, required
    assert {f"facd_fast/configs/{name}.toml" for name in SHIPPED_CONFIGS} <= names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "configs/", "checkpoints/"))]


def test_version_and_package_data_come_from_the_installed_wheel(installed):
    result = _run(["facd", "--version"], cwd=installed["work"], env=installed["env"])
    package = installed["purelib"] / "facd_fast"
    assert result.stdout.strip().startswith(f"facd {facd_fast.__version__} from {package} (torch ")
    listing = _run(["facd", "configs"], cwd=installed["work"], env=installed["env"]).stdout
    assert [line.split()[0] for line in listing.splitlines()[: len(SHIPPED_CONFIGS)]] == list(SHIPPED_CONFIGS)
    assert f"(in {package / 'configs'};" in listing


CHECK_KERNELS = """
import importlib.util, json, torch
import facd_fast, facd_fast._C
from facd_fast import ops
torch.manual_seed(0)
student, teacher = torch.randn(3, 5, 3, 4), torch.randn(3, 5, 3, 4)
expected = facd_fast.contrastive_loss(student, teacher, backend="reference")
found = {"facd_fast": facd_fast.__file__, "_C": facd_fast._C.__file__, "csrc": ops.CSRC,
         "cpp_error": abs(facd_fast.contrastive_loss(student, teacher, backend="cpp") - expected).item()}
if importlib.util.find_spec("triton") is not None:
    import facd_fast.kernels.contrastive
    found["kernels"] = facd_fast.kernels.contrastive.__file__
    found["triton_error"] = abs(facd_fast.contrastive_loss(student, teacher, backend="triton") - expected).item()
print(json.dumps(found))
"""


def test_the_compiled_extension_and_the_triton_kernels_load_from_the_wheel(installed):
    # Triton emulates its kernels on CPU tensors under TRITON_INTERPRET=1 (set before facd_fast is imported).
    env = dict(installed["env"], TRITON_INTERPRET="1")
    found = json.loads(_run(["python", "-c", CHECK_KERNELS], cwd=installed["work"], env=env).stdout)
    package = installed["purelib"] / "facd_fast"
    assert Path(found["facd_fast"]).parent == package and Path(found["_C"]).parent == package
    # The JIT fallback (an extension that does not load against another torch) builds from the shipped sources.
    assert Path(found["csrc"]) == package / "csrc" and (package / "csrc" / "facd_cpu.cpp").is_file()
    assert found["cpp_error"] < 1e-5
    try:
        import triton  # noqa: F401
    except ImportError:
        return  # the triton extra is not installed here: the wheel's kernels are checked by name above
    assert Path(found["kernels"]).parent == package / "kernels"
    assert found["triton_error"] < 1e-5


def test_distill_eval_export_from_a_shipped_config_outside_the_checkout(installed):
    """`facd distill edsr_x4` (the paper's student) from the shipped demo teacher on the built-in photos, x2."""
    work, env = installed["work"], installed["env"]
    _run(["facd", "distill", "edsr_x4", "--method", "facd", "--set", "model.scale=2",
          "--set", "model.teacher=edsr-demo-teacher", "--set", f"model.teacher_checkpoint={PACKAGE_TEACHER}",
          "--set", "data.train_hr_dir=builtin", "--set", "data.val_hr_dir=builtin", "--set", "data.patch_size=32",
          *QUICK], cwd=work, env=env)
    run = work / "runs" / "edsr_x4" / "facd"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if record["kind"] == "train"] == [1, 2]
    assert (work / "datasets" / "builtin" / "val").is_dir()
    result = json.loads(_run(["facd", "eval", run / "facd.pth", "--hr-dir", "datasets/builtin/val", "--scale", "2",
                              "--json"], cwd=work, env=env).stdout)
    # Two steps train nothing worth measuring: this checks the command ran on every held-out photo.
    photos = sorted(path.stem for path in (work / "datasets" / "builtin" / "val").glob("*.png"))
    assert [image["name"] for image in result["images"]] == photos and len(photos) >= 1
    assert all(0 < image["psnr_y"] < 100 for image in result["images"])
    _run(["facd", "export", run / "checkpoints" / "last.pt", "student.pth"], cwd=work, env=env)
    check = "import sys, facd_fast.models as m; n = m.model_from_checkpoint(sys.argv[1]); print(n.preset, n.scale)"
    assert _run(["python", "-c", check, "student.pth"], cwd=work, env=env).stdout.split() == ["edsr-student", "2"]


def test_demo_runs_to_its_table_outside_the_checkout(installed):
    work, env = installed["work"], installed["env"]
    result = _run(["facd", "demo", "--out", "demo-run", "--seeds", "2", *QUICK], cwd=work, env=env)
    assert "teacher: shipped checkpoint " + str(installed["purelib"] / DEMO_TEACHER) in result.stdout
    assert "Y-PSNR mean ± 95% CI (dB)" in result.stdout and "Paired by seed" in result.stdout
    results = json.loads((work / "demo-run" / "results.json").read_text())
    assert results["teacher"]["shipped"] and results["student_steps"] == 2 and results["seeds"] == 2
    assert [group["method"] for group in results["groups"]] == ["none", "fd-l1", "facd"]
