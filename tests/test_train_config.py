"""Configs: TOML over defaults, --set overrides, and clear errors for unknown keys and wrong types."""

import pytest

from facd_fast import resources
from facd_fast.train.config import (DEFAULTS, METHODS, ConfigError, dump_config, load_config,
                                    method_distance, parse_override)

CONFIGS = resources.shipped_configs()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load_by_path_and_by_name(name):
    config = load_config(CONFIGS[name])
    assert set(config) == set(DEFAULTS)
    assert load_config(name) == config == load_config(f"{name}.toml")


@pytest.mark.parametrize("arch", ["edsr", "rcan"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_paper_configs_use_lr_patch_48_batch_16(arch, scale):
    config = load_config(f"{arch}_x{scale}")
    assert config["model"]["scale"] == scale
    assert config["data"]["patch_size"] == 48 * scale
    assert config["train"]["batch_size"] == 16
    assert config["train"]["lr"] == 1e-4 and config["train"]["lr_gamma"] == 0.5


def test_overrides_replace_values_with_their_toml_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nbatch_size = 4\n[model]\nscale = 2\n')
    config = load_config(path, [
        "train.batch_size=8", "train.lr=2e-4", "train.channels_last=false",
        "model.student=edsr-demo-student", 'distill.method="fd-l2"', "distill.tap_weights=[1, 0.5, 2]",
    ])
    assert config["train"]["batch_size"] == 8
    assert config["train"]["lr"] == 2e-4
    assert config["train"]["channels_last"] is False
    assert config["model"]["student"] == "edsr-demo-student"
    assert config["model"]["scale"] == 2
    assert config["distill"]["method"] == "fd-l2"
    assert config["distill"]["tap_weights"] == [1.0, 0.5, 2.0]
    # Untouched keys keep their defaults; the defaults themselves are not modified.
    assert config["train"]["iterations"] == DEFAULTS["train"]["iterations"]
    assert DEFAULTS["train"]["batch_size"] == 16


def test_int_is_accepted_for_a_float_key():
    config = load_config(None, ["train.lr=1"])
    assert config["train"]["lr"] == 1.0 and isinstance(config["train"]["lr"], float)


def test_dumped_config_reads_back(tmp_path):
    config = load_config(None, ["distill.use_mask=true", "model.teacher_checkpoint=a/b.pth"])
    path = tmp_path / "dump.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batchsize=8", "unknown key train.batchsize"),
        ("trian.batch_size=8", "unknown section [trian]"),
        ("train.batch_size=eight", "train.batch_size must be of type int"),
        ("train.batch_size=8.5", "train.batch_size must be of type int"),
        ("train.channels_last=1", "train.channels_last must be of type bool"),
        ("distill.method=fitnet", "distill.method must be one of"),
        ("train.amp=fp16", "train.amp must be one of"),
        ("batch_size=8", "the key must be section.key"),
        ("train.batch_size", "must look like section.key=value"),
    ],
)
def test_bad_overrides_raise_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nbach_size = 8\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key train\.bach_size"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_parse_override_reads_toml_values_and_bare_words():
    assert parse_override("a.b=3") == ("a", "b", 3)
    assert parse_override("a.b = [1, 2]") == ("a", "b", [1, 2])
    assert parse_override("a.b=runs/x") == ("a", "b", "runs/x")
    assert parse_override("a.b=x=y") == ("a", "b", "x=y")


def test_each_method_names_its_feature_term_and_distance():
    from facd_fast.train.terms import TERMS

    assert all(method in TERMS for method in METHODS if method != "none")
    assert {method: method_distance(method, "auto") for method in METHODS} == {
        "none": None, "fd-l1": "l1", "fd-l2": "l2", "fakd": None, "facd": "l1", "facd-nomask": "l1"}
    assert method_distance("facd", "l2") == "l2" and method_distance("facd-nomask", "l2") == "l2"
    assert method_distance("fd-l2", "l2") == "l2" and method_distance("fakd", "l2") is None


@pytest.mark.parametrize("method, distance", [("fd-l1", "l2"), ("fd-l2", "l1")])
def test_a_distance_contradicting_the_fd_method_is_an_error(method, distance):
    with pytest.raises(ConfigError, match=f"distill.distance = '{distance}' contradicts distill.method = '{method}'"):
        load_config(None, [f"distill.method={method}", f"distill.distance={distance}"])
    with pytest.raises(ConfigError, match="contradicts"):
        method_distance(method, distance)
    # the default ("auto") and the distance the name gives are accepted
    assert load_config(None, [f"distill.method={method}"])["distill"]["distance"] == "auto"
    named = {"fd-l1": "l1", "fd-l2": "l2"}[method]
    assert load_config(None, [f"distill.method={method}", f"distill.distance={named}"])["distill"]["distance"] == named
