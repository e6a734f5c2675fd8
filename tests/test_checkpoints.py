"""Checkpoint import/export: foreign layouts written by the test itself, round trips, inference, errors."""
import re

import pytest
import torch

from facd_fast.models import (DIV2K_RGB_MEAN, build, detect_layout, infer_config, load_pretrained,
                              model_from_checkpoint, save_checkpoint_basicsr, to_basicsr_keys)


def _mean_shift_entries(rgb_range=255.0):
    """EDSR-PyTorch's MeanShift 1x1 convs (std 1): weight identity, bias -/+ rgb_range * mean."""
    eye = torch.eye(3).view(3, 3, 1, 1)
    bias = torch.tensor(DIV2K_RGB_MEAN) * rgb_range
    return {"sub_mean.weight": eye, "sub_mean.bias": -bias, "add_mean.weight": eye.clone(), "add_mean.bias": bias}


def _to_edsr_pytorch(model):
    """Our EDSR state dict in sanghyun-son/EDSR-PyTorch's names (the inverse of the loader's mapping)."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^conv_first\.", "head.0.", key)
        key = re.sub(r"^body\.(\d+)\.conv1\.", r"body.\1.body.0.", key)
        key = re.sub(r"^body\.(\d+)\.conv2\.", r"body.\1.body.2.", key)
        key = re.sub(r"^conv_after_body\.", f"body.{model.num_block}.", key)
        key = re.sub(r"^upsample\.", "tail.0.", key)
        key = re.sub(r"^conv_last\.", "tail.1.", key)
        out[key] = value.clone()
    return {**out, **_mean_shift_entries()}


def _to_official_rcan(model):
    """Our RCAN state dict in yulunzhang/RCAN's names."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^conv_first\.", "head.0.", key)
        key = re.sub(r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.([02])\.", r"body.\1.body.\2.body.\3.", key)
        key = re.sub(r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.3\.attention\.([13])\.",
                     lambda m: f"body.{m[1]}.body.{m[2]}.body.3.conv_du.{int(m[3]) - 1}.", key)
        key = re.sub(r"^body\.(\d+)\.conv\.", rf"body.\1.body.{model.num_block}.", key)
        key = re.sub(r"^conv_after_body\.", f"body.{model.num_group}.", key)
        key = re.sub(r"^upsample\.", "tail.0.", key)
        key = re.sub(r"^conv_last\.", "tail.1.", key)
        out[key] = value.clone()
    return {**out, **_mean_shift_entries()}


def _small_edsr(scale, seed=0):
    torch.manual_seed(seed)
    return build("edsr-student", scale, num_block=3, num_feat=16)


def _small_rcan(scale, seed=0):
    torch.manual_seed(seed)
    return build("rcan-student", scale, num_group=3, num_block=2, num_feat=16, reduction=4)


def _same_outputs(a, b):
    x = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_pytorch_checkpoint_loads_and_gives_identical_outputs(tmp_path, scale):
    source = _small_edsr(scale)
    foreign = _to_edsr_pytorch(source)
    assert {"head.0.weight", "body.0.body.0.weight", "body.3.weight", "tail.0.0.weight", "tail.1.bias"} <= set(foreign)
    torch.save(foreign, tmp_path / f"EDSR_x{scale}.pt")
    assert detect_layout(foreign) == "edsr-pytorch"
    target = _small_edsr(scale, seed=1)
    load_pretrained(target, tmp_path / f"EDSR_x{scale}.pt")
    _same_outputs(source, target)
    inferred = model_from_checkpoint(tmp_path / f"EDSR_x{scale}.pt")
    assert inferred.arch == "edsr" and inferred.scale == scale and inferred.num_block == 3
    _same_outputs(source, inferred)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_official_rcan_checkpoint_loads_and_gives_identical_outputs(tmp_path, scale):
    source = _small_rcan(scale)
    foreign = _to_official_rcan(source)
    assert {"body.2.body.1.body.3.conv_du.0.weight", "body.2.body.2.weight", "body.3.weight"} <= set(foreign)
    assert detect_layout(foreign) == "rcan-official"
    torch.save(foreign, tmp_path / "RCAN.pt")
    target = _small_rcan(scale, seed=1)
    load_pretrained(target, tmp_path / "RCAN.pt")
    _same_outputs(source, target)
    inferred = model_from_checkpoint(foreign)
    assert (inferred.arch, inferred.scale, inferred.num_group, inferred.num_block, inferred.reduction) == \
        ("rcan", scale, 3, 2, 4)
    _same_outputs(source, inferred)


def test_basicsr_file_prefers_params_ema_and_strips_module_prefix(tmp_path):
    trained, averaged = _small_edsr(4, seed=2), _small_edsr(4, seed=3)
    wrapped = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"params": wrapped(trained), "params_ema": wrapped(averaged)}, tmp_path / "net_g.pth")
    target = _small_edsr(4, seed=4)
    load_pretrained(target, tmp_path / "net_g.pth")
    _same_outputs(averaged, target)
    load_pretrained(target, tmp_path / "net_g.pth", param_key="params")
    _same_outputs(trained, target)
    with pytest.raises(ValueError, match="no entry 'net_g'"):
        load_pretrained(target, tmp_path / "net_g.pth", param_key="net_g")


def test_export_then_import_round_trips(tmp_path):
    source = build("rcan-student", 3, num_group=3, num_block=2, num_feat=16, reduction=4, taps=["conv_first", 1])
    path = save_checkpoint_basicsr(source, tmp_path / "out" / "student.pth")
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.pth"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw["params"]) == set(source.state_dict())
    assert raw["facd_fast"] == {"arch": "rcan", "config": source.config(), "scale": 3}
    rebuilt = model_from_checkpoint(path)
    assert rebuilt.config() == source.config()
    _same_outputs(source, rebuilt)
    target = build("rcan-student", 3, num_group=3, num_block=2, num_feat=16, reduction=4)
    load_pretrained(target, path)  # a plain BasicSR reader of the same architecture loads it too
    _same_outputs(source, target)


@pytest.mark.parametrize("preset, scale, to_foreign", [
    ("edsr-teacher", 4, _to_edsr_pytorch), ("edsr-student", 3, _to_edsr_pytorch),
    ("rcan-teacher", 2, _to_official_rcan), ("rcan-student", 4, _to_official_rcan),
])
def test_infer_architecture_of_full_size_foreign_checkpoints(preset, scale, to_foreign):
    with torch.device("meta"):  # shapes only: the full teachers are never allocated
        model = build(preset, scale)
    config = infer_config(to_basicsr_keys(to_foreign(model)))
    shape_keys = ("arch", "scale", "num_feat", "num_block", "num_group", "reduction", "num_in_ch", "num_out_ch")
    assert {k: config.get(k) for k in shape_keys} == {k: model.config().get(k) for k in shape_keys}
    assert config["res_scale"] == model.res_scale  # 0.1 for the EDSR teacher: not in the weights, from its preset
    assert config["preset"] == preset


def test_files_recording_the_former_edsr_baseline_preset_still_load(tmp_path):
    torch.manual_seed(7)
    source = build("edsr-student", 2)
    path = save_checkpoint_basicsr(source, tmp_path / "old.pth")
    state = torch.load(path, weights_only=True)
    state["facd_fast"]["config"]["preset"] = "edsr-baseline"  # as written before the preset was merged
    torch.save(state, path)
    rebuilt = model_from_checkpoint(path)
    assert rebuilt.preset == "edsr-student" and rebuilt.config() == source.config()
    _same_outputs(source, rebuilt)
    assert model_from_checkpoint(path, preset="edsr-student", scale=2).config() == source.config()
    with pytest.raises(ValueError, match="'edsr-baseline' is now 'edsr-student'"):
        build("edsr-baseline", 2)


def test_preset_argument_builds_that_preset(tmp_path):
    torch.manual_seed(6)
    source = build("edsr-demo-student", 2)
    rebuilt = model_from_checkpoint({"params": source.state_dict()}, preset="edsr-demo-student")
    assert rebuilt.preset == "edsr-demo-student" and rebuilt.scale == 2
    _same_outputs(source, rebuilt)
    with pytest.raises(ValueError, match="does not fit"):
        model_from_checkpoint({"params": source.state_dict()}, preset="edsr-demo-student", scale=4)
    path = save_checkpoint_basicsr(source, tmp_path / "demo.pth")
    assert model_from_checkpoint(path, preset="edsr-demo-student", scale=2).config() == source.config()
    wide = save_checkpoint_basicsr(build("edsr-demo-student", 2, res_scale=0.5), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="another architecture than preset 'edsr-demo-student': res_scale: file 0.5"):
        model_from_checkpoint(wide, preset="edsr-demo-student")


def test_mismatch_lists_missing_and_unexpected_keys():
    student = build("edsr-demo-student", 2)
    with pytest.raises(ValueError) as error:
        load_pretrained(student, _small_rcan(2).state_dict())
    message = str(error.value)
    assert "missing keys" in message and "body.0.conv1.weight" in message
    assert "unexpected keys" in message and "body.0.residual_group.0.rcab.0.weight" in message
    with pytest.raises(ValueError, match=r"missing keys \(2\): upsample\.2\.bias, upsample\.2\.weight"):
        load_pretrained(build("edsr-demo-student", 4), student.state_dict())
    wrong_width = _small_edsr(2).state_dict() | {"body.0.conv1.bias": torch.zeros(32)}
    expected = r"shape mismatches \(1\): body\.0\.conv1\.bias: checkpoint \(32,\) vs model \(16,\)$"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(_small_edsr(2), wrong_width)


def test_non_strict_load_reports_instead_of_raising():
    student = build("edsr-demo-student", 2)
    report = load_pretrained(student, {"conv_first.weight": torch.ones(32, 3, 3, 3), "extra.weight": torch.ones(1)},
                             strict=False)
    assert "extra.weight" in report["unexpected"] and "conv_last.weight" in report["missing"]
    assert torch.equal(student.conv_first.weight, torch.ones(32, 3, 3, 3))


def test_foreign_mean_shift_must_match():
    foreign = _to_edsr_pytorch(_small_edsr(2)) | {
        key: value for key, value in _mean_shift_entries(rgb_range=1.0).items()}
    with pytest.raises(ValueError, match="sub_mean .* is not the mean shift"):
        load_pretrained(_small_edsr(2), foreign)


def test_bad_checkpoint_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        load_pretrained(_small_edsr(2), tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        model_from_checkpoint(tmp_path / "corrupt.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        load_pretrained(_small_edsr(2), {"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="holds no tensors"):
        load_pretrained(_small_edsr(2), {"epoch": 3})
    with pytest.raises(TypeError, match="path or a state dict"):
        load_pretrained(_small_edsr(2), 42)
    path = save_checkpoint_basicsr(_small_edsr(2), tmp_path / "x2.pth")
    with pytest.raises(ValueError, match="scale=4 disagrees"):
        model_from_checkpoint(path, scale=4)


def test_wrapped_models_save_and_load_as_the_bare_network(tmp_path):
    source = _small_edsr(2, seed=7)
    compiled = torch.compile(source)  # an OptimizedModule holding the network as _orig_mod (compiles nothing yet)
    assert all(key.startswith("_orig_mod.") for key in compiled.state_dict())
    path = save_checkpoint_basicsr(compiled, tmp_path / "compiled.pth")
    assert set(torch.load(path, weights_only=True)["params"]) == set(source.state_dict())
    target = _small_edsr(2, seed=8)
    load_pretrained(torch.nn.DataParallel(target), compiled.state_dict())
    _same_outputs(source, target)


def test_inference_needs_the_defining_keys():
    state = _small_edsr(2).state_dict()
    del state["conv_last.weight"]
    with pytest.raises(ValueError, match=r"cannot infer the architecture: the checkpoint lacks \['conv_last.weight'\]"):
        model_from_checkpoint(state)


class NotWeights:
    """Any object: unpickling it would run code, so a checkpoint holding it is refused."""


def test_read_checkpoint_takes_rng_states_but_runs_no_pickled_code(tmp_path):
    import io
    import zipfile

    import numpy as np

    from facd_fast.models import read_checkpoint

    state = {"rng": np.random.get_state(), "weights": {"w": torch.ones(2)}}
    torch.save(state, tmp_path / "state.pt")
    assert np.array_equal(read_checkpoint(tmp_path / "state.pt")["rng"][1], state["rng"][1])
    # The same file as numpy 1 writes it (numpy.core instead of numpy._core) loads too.
    source = zipfile.ZipFile(tmp_path / "state.pt")
    renamed = io.BytesIO()
    with zipfile.ZipFile(renamed, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(item, data)
    (tmp_path / "numpy1.pt").write_bytes(renamed.getvalue())
    assert np.array_equal(read_checkpoint(tmp_path / "numpy1.pt")["rng"][1], state["rng"][1])
    torch.save({"w": torch.ones(1), "how": NotWeights()}, tmp_path / "object.pt")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {tmp_path / 'object.pt'}.*NotWeights"):
        read_checkpoint(tmp_path / "object.pt")
