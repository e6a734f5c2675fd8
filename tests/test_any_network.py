"""Distilling networks defined outside facd_fast: taps by module name, factories, loss terms as plug-ins."""
import gc
import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facd_fast import FeatureTaps, models
from facd_fast.cli import main
from facd_fast.train import register_term
from facd_fast.train.config import load_config
from facd_fast.train.terms import TERMS
from facd_fast.train.trainer import Trainer
from train_fixtures import tiny_config, write_images
from user_nets import PlainSR

SHIPPED_TEACHER = "package:checkpoints/edsr-demo-teacher-x2.pth"
PLAIN = ["model.student=user_nets:build_plain", "model.student_kwargs={width = 12, depth = 3}",
         'model.student_taps=["stages.0", "stages.2", "fuse"]']


def _sets(values):
    return [part for value in values for part in ("--set", value)]


# --- FeatureTaps -------------------------------------------------------------------------------------
def test_taps_record_named_outputs_in_order_and_each_forward_afresh():
    torch.manual_seed(0)
    network = PlainSR(2, width=8, depth=3)
    x = torch.rand(2, 3, 10, 12)
    expected = {}
    h = network.head(x)
    for index, stage in enumerate(network.stages):
        h = stage(h)
        expected[f"stages.{index}"] = h
    with FeatureTaps(network, ["stages.2", "head", "stages.0"]) as taps:
        network(x)
        features = taps.features()
        torch.testing.assert_close(features[0], expected["stages.2"])
        torch.testing.assert_close(features[1], network.head(x))
        torch.testing.assert_close(features[2], expected["stages.0"])
        assert taps.names == ("stages.2", "head", "stages.0")
        network(torch.rand(1, 3, 6, 6))
        assert taps.features()[0].shape == (1, 8, 6, 6)  # the last forward's, not the first's
    assert not network._forward_hooks and not network.stages[2]._forward_hooks  # removed on leaving the block


def test_tap_errors_name_the_module_and_the_nearest_valid_names():
    network = PlainSR(2)
    with pytest.raises(ValueError, match=r"has no module named 'stage.1'; nearest: stages.1"):
        FeatureTaps(network, ["stage.1"])
    with pytest.raises(ValueError, match="more than once"):
        FeatureTaps(network, ["head", "head"])
    with pytest.raises(TypeError, match="list of module names"):
        FeatureTaps(network, "head")
    taps = FeatureTaps(network, ["head"])
    with pytest.raises(RuntimeError, match="recorded nothing"):
        taps.features()


def test_a_tap_modified_in_place_later_in_the_forward_is_an_error():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            y.mul_(2)
            return y

    network = InPlace()
    taps = FeatureTaps(network, ["conv"])
    with torch.no_grad():
        network(torch.rand(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="modified in place"):
        taps.features()


def test_taps_under_torch_compile_match_eager():
    torch.manual_seed(0)
    network = PlainSR(2, width=8, depth=2)
    x = torch.rand(2, 3, 8, 8)
    taps = FeatureTaps(network, ["stages.0", "fuse"])
    eager_sr = network(x)
    eager = [f.detach().clone() for f in taps.features()]
    compiled = torch.compile(network, backend="aot_eager", fullgraph=True)
    sr = compiled(x)
    torch.testing.assert_close(sr, eager_sr)
    for feature, reference in zip(taps.features(), eager):
        torch.testing.assert_close(feature, reference)
    sum(f.sum() for f in taps.features()).backward()  # the compiled taps carry gradients
    assert network.stages[0].conv.weight.grad is not None


def test_a_submodule_named_module_is_part_of_the_network_not_a_wrapper():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.tail = torch.nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            return self.tail(self.module(x))

    network = Wrapped()
    taps = FeatureTaps(network, ["module", "tail"])
    network(torch.rand(1, 3, 6, 6))
    assert [f.shape[1] for f in taps.features()] == [4, 3]


def test_taps_through_a_ddp_wrapper_carry_gradients():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    network = PlainSR(2, width=8, depth=2)
    wrapped = taps = sr = None
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(network)
        taps = FeatureTaps(wrapped, ["stages.1"])  # the bare network's names, not "module.stages.1"
        sr = wrapped(torch.rand(2, 3, 8, 8))
        (sr.mean() + taps.features()[0].mean()).backward()
        assert network.stages[1].mix.weight.grad is not None
    finally:
        # DDP's reducer holds the process group: free it first (freed after the group is destroyed, the group's
        # destructor can wait forever on gloo's threads).
        del wrapped, taps, sr
        gc.collect()
        dist.destroy_process_group()


# --- networks from a user's code --------------------------------------------------------------------
def test_factory_networks_are_built_with_scale_and_kwargs_and_record_them():
    network = models.build_network("user_nets:build_plain", 3, {"width": 10, "depth": 1})
    assert isinstance(network, PlainSR) and network.head.out_channels == 10 and len(network.stages) == 1
    assert models.network_scale(network) == 3
    assert models.model_meta(network) == {"factory": "user_nets:build_plain", "kwargs": {"width": 10, "depth": 1},
                                          "scale": 3}
    with pytest.raises(ValueError, match="cannot import module 'no_such_package.nets'"):
        models.build_network("no_such_package.nets:build", 2)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        models.build_network("user_nets:missing", 2)
    with pytest.raises(ValueError, match="returned a str, not a torch.nn.Module"):
        models.build_network("user_nets:not_a_network", 2)
    with pytest.raises(ValueError, match=r"model_kwargs: .*unexpected keyword|failed: .*unexpected keyword"):
        models.build_network("user_nets:build_plain", 2, {"colour": 3})


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The user's PlainSR distilled from the shipped demo teacher through the CLI, taps given by name."""
    tmp_path = tmp_path_factory.mktemp("plain")
    config = tiny_config(tmp_path, run={"deterministic": False})
    out = tmp_path / "run"
    assert main(["distill", str(config), "--method", "facd",
                 *_sets([*PLAIN, f"model.teacher_checkpoint={SHIPPED_TEACHER}", f"run.out_dir={out}",
                         "train.iterations=4", "train.checkpoint_every=2"])]) == 0
    return {"tmp": tmp_path, "config": config, "export": out / "facd" / "facd.pth", "out": out}


def test_a_users_network_distils_and_its_export_records_the_factory(plain_run):
    records = [json.loads(line) for line in (plain_run["out"] / "facd" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["feature"]) for r in train)
    stored = torch.load(plain_run["export"], weights_only=True)
    assert stored["facd_fast"] == {"factory": "user_nets:build_plain", "kwargs": {"width": 12, "depth": 3}, "scale": 2}
    assert "head.weight" in stored["params"] and not any("adapters" in k for k in stored["params"])
    network = models.model_from_checkpoint(plain_run["export"])
    assert isinstance(network, PlainSR) and network.head.out_channels == 12


def test_the_exported_user_network_evaluates_upscales_and_exports_to_onnx(plain_run, capsys):
    tmp = plain_run["tmp"]
    assert main(["eval", str(plain_run["export"]), "--hr-dir", str(tmp / "data" / "val"), "--scale", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["mean_psnr_y"]) and len(result["images"]) == 2
    photos = write_images(tmp / "photos", 1, 24, seed=5)
    assert main(["upscale", str(plain_run["export"]), str(photos), "--out", str(tmp / "up")]) == 0
    from PIL import Image

    assert Image.open(tmp / "up" / "img00.png").size == (48, 48)
    onnx_path = tmp / "plain.onnx"
    assert main(["export", str(plain_run["export"]), str(onnx_path), "--format", "onnx"]) == 0
    assert "ONNX Runtime vs PyTorch" in capsys.readouterr().out
    import onnxruntime

    network = models.model_from_checkpoint(plain_run["export"]).eval()
    x = torch.rand(1, 3, 13, 17)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"lr": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, network(x).numpy(), atol=1e-4)


def test_a_moved_factory_is_one_error_saying_how_and_model_rebuilds_it(plain_run, tmp_path, capsys):
    stored = torch.load(plain_run["export"], weights_only=True)
    stored["facd_fast"]["factory"] = "moved_away.nets:build_plain"
    moved = tmp_path / "moved.pth"
    torch.save(stored, moved)
    hr_dir = str(plain_run["tmp"] / "data" / "val")
    assert main(["eval", str(moved), "--hr-dir", hr_dir, "--scale", "2", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot import module 'moved_away.nets'" in err and "--model package.module" in err
    assert main(["eval", str(moved), "--hr-dir", hr_dir, "--scale", "2", "--json", "--model",
                 "user_nets:build_plain"]) == 2  # the moved record's kwargs do not apply to another factory name
    assert "does not fit PlainSR" in capsys.readouterr().err
    stored["facd_fast"]["factory"] = "user_nets:build_plain"
    torch.save(stored, moved)
    assert main(["eval", str(moved), "--hr-dir", hr_dir, "--scale", "2", "--json"]) == 0


def test_an_rcan_teacher_distils_an_edsr_student(tmp_path):
    teacher = tmp_path / "rcan.pth"
    torch.manual_seed(2)
    models.save_checkpoint_basicsr(models.build("rcan-student", 2, num_group=3, num_block=2), teacher)
    config = tiny_config(tmp_path, run={"deterministic": False})
    assert main(["distill", str(config), "--method", "fd-l1", *_sets([
        "model.teacher=rcan-student", "model.teacher_kwargs={num_group = 3, num_block = 2}",
        f"model.teacher_checkpoint={teacher}", "train.iterations=2", f"run.out_dir={tmp_path / 'run'}"])]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "fd-l1" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["feature"]) for r in records if r["kind"] == "train")


@register_term("test_edge", group="output")
def _edge_term(inputs):
    """Per-patch L1 between the horizontal gradients of the student's and the teacher's outputs."""
    def grad(x):
        return x[..., 1:] - x[..., :-1]
    return (grad(inputs.sr_student) - grad(inputs.sr_teacher)).abs().flatten(1).mean(1)


def test_a_registered_term_trains_and_appears_in_the_log(tmp_path):
    assert TERMS["test_edge"].group == "output" and TERMS["test_edge"].needs_teacher
    config = tiny_config(tmp_path, run={"deterministic": False})
    assert main(["distill", str(config), "--method", "fd-l1", *_sets([
        "distill.terms={test_edge = 0.5}", "train.iterations=3", f"run.out_dir={tmp_path / 'run'}"])]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "fd-l1" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert all(np.isfinite(r["test_edge"]) and r["test_edge"] > 0 for r in train)
    assert "grad_output" in train[0] and "feature" in train[0]
    # the same term named by its module path: the import registers it
    objective = Trainer(load_config(config, ['distill.terms={"test_any_network:_edge_term" = 0.5}',
                                             f"run.out_dir={tmp_path / 'run2'}"]), mode="distill").model.objective
    assert list(objective.terms) == ["pixel", "output", "facd", "test_edge"]
    assert objective.weights["test_edge"] == 0.5


def test_terms_override_the_method_weights_and_zero_removes_one(tmp_path):
    from facd_fast.train.objective import DistillationObjective

    objective = DistillationObjective("facd", alpha=0.5, feature_weight=0.01, terms={"output": 0.0, "fd-l2": 0.2})
    assert objective.weights == {"pixel": 0.5, "facd": 0.01, "fd-l2": 0.2}
    assert objective.log_keys == {"pixel": "l1_hr", "facd": "feature", "fd-l2": "fd-l2"}
    sr_s, sr_t, hr = (torch.rand(2, 3, 8, 8) for _ in range(3))
    s, t = [torch.randn(2, 4, 4, 4) for _ in range(3)], [torch.randn(2, 4, 4, 4) for _ in range(3)]
    loss, terms = objective(sr_s, s, sr_t, t, hr)
    expected = 0.5 * F.l1_loss(sr_s, hr) + 0.01 * terms["feature"] + 0.2 * terms["fd-l2"]
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("sets, expected", [
    (["model.student_taps=[\"stages.0\", \"stage.2\", \"fuse\"]"],
     "model.student_taps: PlainSR has no module named 'stage.2'; nearest: stages.2"),
    (["model.student=no_such_package.nets:build_plain"], "model.student: cannot import module 'no_such_package.nets'"),
    (['model.student_taps=["stages.0", "stages.1", "tail"]'], "tap 2: student 'tail' gives (1, 3, 16, 16) and teacher "
                                                               "'conv_after_body' gives (1, 64, 8, 8)"),
    (["model.student_taps=[]"], "model.student_taps is empty and PlainSR is not a preset"),
])
def test_a_wrong_tap_factory_or_spatial_mismatch_is_one_error(plain_run, tmp_path, capsys, sets, expected):
    args = ["distill", str(plain_run["config"]), "--method", "facd",
            *_sets([*PLAIN, *sets, f"run.out_dir={tmp_path / 'run'}"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("facd: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing written
