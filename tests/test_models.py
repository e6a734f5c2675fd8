"""EDSR / RCAN: parameter counts, BasicSR parameter names, forward shapes, feature taps, DR adapters."""
import pytest
import torch

from facd_fast.models import (DIV2K_RGB_MEAN, EDSR, PRESETS, RCAN, DRAdapters, build, count_parameters,
                              from_config)


def _meta_count(name, scale=4):
    with torch.device("meta"):
        return count_parameters(build(name, scale))


# Published sizes at x4 (EDSR paper, RCAN paper): 43.09 M, 1.518 M, 15.59 M. The exact
# numbers are those of BasicSR's archs, whose mean shift holds no parameters.
@pytest.mark.parametrize("name, exact, published_m, digits", [
    ("edsr-teacher", 43_089_923, 43.09, 2),
    ("edsr-student", 1_517_571, 1.518, 3),
    ("rcan-teacher", 15_592_355, 15.59, 2),
])
def test_parameter_counts_match_the_public_models(name, exact, published_m, digits):
    count = _meta_count(name)
    assert count == exact
    assert round(count / 1e6, digits) == published_m


def test_parameter_count_by_hand_for_the_edsr_student():
    conv3 = lambda cin, cout: cin * cout * 9 + cout  # noqa: E731
    body = 16 * 2 * conv3(64, 64)
    upsample = 2 * conv3(64, 256)
    expected = conv3(3, 64) + body + conv3(64, 64) + upsample + conv3(64, 3)
    assert _meta_count("edsr-student") == expected


def test_basicsr_parameter_names():
    edsr = build("edsr-demo-student", 4).state_dict()
    for key in ("conv_first.weight", "body.0.conv1.weight", "body.3.conv2.bias", "conv_after_body.weight",
                "upsample.0.weight", "upsample.2.weight", "conv_last.bias"):
        assert key in edsr
    assert not any("mean" in key for key in edsr)  # the mean shift is a non-persistent buffer, as in BasicSR
    rcan = build("rcan-student", 4, num_group=2, num_block=2, num_feat=16, reduction=4).state_dict()
    for key in ("body.1.residual_group.1.rcab.0.weight", "body.1.residual_group.1.rcab.2.bias",
                "body.0.residual_group.0.rcab.3.attention.1.weight", "body.0.residual_group.0.rcab.3.attention.3.bias",
                "body.1.conv.weight", "conv_after_body.weight", "upsample.2.weight"):
        assert key in rcan
    assert rcan["body.0.residual_group.0.rcab.3.attention.1.weight"].shape == (4, 16, 1, 1)


@pytest.mark.parametrize("scale, convs, growth", [(2, [0], 4), (3, [0], 9), (4, [0, 2], 4), (8, [0, 2, 4], 4)])
def test_upsampler_layout(scale, convs, growth):
    state = build("edsr-demo-student", scale).state_dict()
    found = sorted(int(key.split(".")[1]) for key in state if key.startswith("upsample.") and key.endswith("weight"))
    assert found == convs
    assert state["upsample.0.weight"].shape == (growth * 32, 32, 3, 3)


@pytest.mark.parametrize("arch_kwargs", [
    ("edsr", dict(num_feat=8, num_block=6)),
    ("rcan", dict(num_feat=8, num_group=10, num_block=1, reduction=4)),
], ids=["edsr", "rcan"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_forward_shapes_and_taps(arch_kwargs, scale):
    arch, kwargs = arch_kwargs
    torch.manual_seed(0)
    model = (EDSR if arch == "edsr" else RCAN)(scale, **kwargs)
    x = torch.rand(2, 3, 7, 5)
    sr = model(x)
    assert sr.shape == (2, 3, 7 * scale, 5 * scale) and sr.dtype == torch.float32
    sr_again, features = model(x, return_features=True)
    torch.testing.assert_close(sr_again, sr, rtol=0, atol=0)
    assert len(features) == 3
    assert all(f.shape == (2, 8, 7, 5) for f in features)


def test_default_taps_follow_the_spec():
    assert build("edsr-student").taps == ("body.4", "body.10", "conv_after_body")  # runs of 5, 6, 5 blocks
    assert build("edsr-demo-teacher").taps == ("body.2", "body.4", "conv_after_body")
    with torch.device("meta"):
        assert build("edsr-teacher").taps == ("body.10", "body.20", "conv_after_body")  # runs of 11, 10, 11
        assert build("rcan-teacher").taps == ("body.1", "body.5", "conv_after_body")  # after groups 2 and 6
        assert build("rcan-student").taps == ("body.1", "body.5", "conv_after_body")


def _outputs_by_hooks(model, x, names):
    """The outputs of the named submodules, recorded by forward hooks (independent of the tap code)."""
    recorded = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: recorded.__setitem__(name, out.clone())) for name in names]
    model(x)
    for handle in handles:
        handle.remove()
    return [recorded[name] for name in names]


@pytest.mark.parametrize("taps", [None, (0, "body.3", "conv_first"), ["conv_after_body"], 2])
def test_taps_are_the_named_module_outputs(taps):
    torch.manual_seed(1)
    model = build("edsr-demo-student", 2, taps=taps)
    x = torch.rand(1, 3, 6, 6)
    _, features = model(x, return_features=True)
    expected = _outputs_by_hooks(model, x, model.taps)
    assert len(features) == len(model.taps)
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_global_skip_does_not_modify_the_last_tap_in_place():
    torch.manual_seed(2)
    model = build("edsr-demo-student", 2)
    x = torch.rand(1, 3, 5, 5)
    _, features = model(x, return_features=True)
    body_out = model.conv_after_body(model.body(model.conv_first((x - model.mean) * 255.0)))
    torch.testing.assert_close(features[-1], body_out)


def test_plain_forward_skips_the_tap_path(monkeypatch):
    model = build("edsr-demo-student", 2)

    def fail(*args):
        raise AssertionError("taps collected although return_features=False")

    monkeypatch.setattr(model, "_body_with_taps", fail)
    assert model(torch.rand(1, 3, 4, 4)).shape == (1, 3, 8, 8)


def test_mean_shift_and_range_as_basicsr():
    model = build("edsr-demo-student", 2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # All convs zero: the output is the mean added back after dividing by img_range.
    out = model(torch.rand(1, 3, 4, 4))
    torch.testing.assert_close(out, torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    tapped = build("edsr-demo-student", 2, taps=["conv_first"])
    with torch.no_grad():
        for p in tapped.parameters():
            p.zero_()
        tapped.conv_first.weight[0, 0, 1, 1] = 1.0  # channel 0 of conv_first passes the shifted R through
    x = torch.rand(1, 3, 4, 4)
    _, (first,) = tapped(x, return_features=True)
    torch.testing.assert_close(first[0, 0], (x[0, 0] - DIV2K_RGB_MEAN[0]) * 255.0)


def test_float64_input():
    model = build("edsr-demo-student", 2).double()
    assert model(torch.rand(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_config_rebuilds_the_same_model():
    torch.manual_seed(3)
    model = build("rcan-student", 3, num_group=3, num_block=2, num_feat=16, reduction=8, taps=[0, 2])
    config = model.config()
    assert config["arch"] == "rcan" and config["preset"] == "rcan-student" and config["taps"] == ["body.0", "body.2"]
    rebuilt = from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert rebuilt.taps == model.taps and rebuilt.scale == 3 and rebuilt.num_feat == 16 and rebuilt.arch == "rcan"


def test_presets_table():
    assert set(PRESETS) >= {"edsr-teacher", "edsr-student", "rcan-teacher", "rcan-student",
                            "edsr-demo-teacher", "edsr-demo-student"}
    assert len({repr(entry) for entry in PRESETS.values()}) == len(PRESETS)  # no two names for one network
    assert build("edsr-demo-teacher").res_scale == 1.0
    with torch.device("meta"):
        assert build("edsr-teacher").res_scale == 0.1


def test_dr_adapters():
    torch.manual_seed(4)
    dr = DRAdapters(32, 64, num_taps=3)
    assert count_parameters(dr) == 3 * (32 * 64 + 64)
    assert all(conv.kernel_size == (1, 1) and conv.bias is not None for conv in dr.adapters)
    student = build("edsr-demo-student", 2)
    _, features = student(torch.rand(2, 3, 6, 6), return_features=True)
    out = dr(features)
    assert [o.shape for o in out] == [(2, 64, 6, 6)] * 3
    torch.testing.assert_close(out[1], torch.nn.functional.conv2d(features[1], dr.adapters[1].weight,
                                                                 dr.adapters[1].bias))
    assert not any("adapter" in key for key in student.state_dict())
    with pytest.raises(ValueError, match="one tensor per tap"):
        dr(features[:2])
    with pytest.raises(ValueError, match=r"features\[0\] must be \(B, 32"):
        dr([torch.rand(2, 16, 6, 6)] * 3)
    with pytest.raises(ValueError, match="student_channels"):
        DRAdapters(0, 64)


@pytest.mark.parametrize("call, error, match", [
    (lambda: build("edsr-huge"), ValueError, "unknown model preset 'edsr-huge'"),
    (lambda: build("edsr-student", 5), ValueError, "scale must be one of"),
    (lambda: build("edsr-student", 1), ValueError, "scale must be one of"),
    (lambda: build("edsr-student", "4"), TypeError, "scale must be an int"),
    (lambda: build("edsr-student", 4, depth=3), TypeError, "unknown overrides"),
    (lambda: build("edsr-student", 4, num_group=3), TypeError, "num_group and reduction do not apply"),
    (lambda: build("edsr-student", 4, num_block=0), ValueError, "num_block must be >= 1"),
    (lambda: build("edsr-student", 4, res_scale=-1.0), ValueError, "res_scale must be > 0.0"),
    (lambda: build("edsr-student", 4, res_scale=True), TypeError, "res_scale must be a real number"),
    (lambda: build("rcan-student", 4, reduction=128), ValueError, "reduction must be <= num_feat"),
    (lambda: build("edsr-student", 4, taps=[16]), ValueError, "16 is not a tap"),
    (lambda: build("edsr-student", 4, taps=["tail"]), ValueError, "'tail' is not a tap"),
    (lambda: build("edsr-student", 4, taps=[1, "body.1"]), ValueError, "without repeats"),
    (lambda: build("edsr-student", 4, taps=[]), ValueError, "non-empty"),
    (lambda: from_config({"arch": "srcnn"}), ValueError, "arch"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
