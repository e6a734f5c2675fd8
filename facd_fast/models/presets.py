"""Named model configurations and the builders that use them."""
from __future__ import annotations

from torch import nn

from .edsr import EDSR
from .rcan import RCAN

ARCHS = {"edsr": EDSR, "rcan": RCAN}

# name -> (arch, constructor kwargs). The teacher and student rows are the
# networks of docs/models.md, "Feature taps"; the demo rows are small enough to train on a CPU.
PRESETS: dict[str, tuple[str, dict]] = {
    "edsr-teacher": ("edsr", {"num_block": 32, "num_feat": 256, "res_scale": 0.1}),
    "edsr-student": ("edsr", {"num_block": 16, "num_feat": 64, "res_scale": 1.0}),
    "rcan-teacher": ("rcan", {"num_group": 10, "num_block": 20, "num_feat": 64, "reduction": 16}),
    "rcan-student": ("rcan", {"num_group": 10, "num_block": 6, "num_feat": 64, "reduction": 16}),
    "edsr-demo-teacher": ("edsr", {"num_block": 8, "num_feat": 64, "res_scale": 1.0}),
    "edsr-demo-student": ("edsr", {"num_block": 4, "num_feat": 32, "res_scale": 1.0}),
}

#: Former preset names -> the preset that is the same network (files recording them still load).
RENAMED_PRESETS = {"edsr-baseline": "edsr-student"}

OVERRIDABLE = ("num_block", "num_feat", "res_scale", "num_group", "reduction", "taps")


def build(name: str, scale: int = 4, **overrides) -> nn.Module:
    """The preset ``name`` at ``scale``, with constructor arguments replaced by ``overrides``."""
    if name in RENAMED_PRESETS:
        raise ValueError(f"model preset {name!r} is now {RENAMED_PRESETS[name]!r} (the same network)")
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    arch, kwargs = PRESETS[name]
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"build() got unknown overrides {unknown}; allowed: {list(OVERRIDABLE)}")
    if arch == "edsr" and {"num_group", "reduction"} & set(overrides):
        raise TypeError(f"{name} is an EDSR: num_group and reduction do not apply")
    return ARCHS[arch](scale, **{**kwargs, **overrides}, preset=name)


def from_config(config: dict) -> nn.Module:
    """Rebuild a model from ``model.config()`` (the dict also stored in our checkpoints)."""
    if not isinstance(config, dict) or config.get("arch") not in ARCHS:
        raise ValueError(f"config must be a dict with 'arch' in {sorted(ARCHS)}, got {config!r}")
    kwargs = {key: value for key, value in config.items() if key != "arch"}
    if kwargs.get("preset") in RENAMED_PRESETS:
        kwargs["preset"] = RENAMED_PRESETS[kwargs["preset"]]
    return ARCHS[config["arch"]](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as the mean shift excluded)."""
    return sum(p.numel() for p in model.parameters())
