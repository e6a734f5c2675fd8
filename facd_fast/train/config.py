"""Training configuration: TOML files over built-in defaults, plus ``--set`` overrides.

A config is a two-level mapping ``section -> key -> value``. :data:`DEFAULTS`
lists every key the trainer reads with its default and type; a TOML file or
an override may only set keys that exist there (a typo is an error naming
the key and the keys that do exist), with a value of the default's type.
:func:`validate_config` then checks every value's range and the values that
depend on each other (counts and periods >= 1, finite rates, weights and
margins, alpha in [0, 1], an existing device, preset and backend);
:func:`load_config` runs it, so a bad config fails before anything is written.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from ..checks import check_int, check_real, check_scale
from ..resources import config_path
from .config_toml import dump_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Config = Dict[str, Dict[str, Any]]

__all__ = ["DEFAULTS", "METHODS", "Config", "ConfigError", "ConfigTypeError", "check_device", "dump_config",
           "load_config", "method_distance", "parse_override", "validate_config"]

#: distill.method, the shorthand for a set of loss terms (facd_fast.train.objective.method_weights): the
#: student alone ("none"), or the name of the registered feature term it adds (facd_fast.train.terms).
METHODS = ("none", "fd-l1", "fd-l2", "fakd", "facd", "facd-nomask")

DEFAULTS: Config = {
    "run": {
        # A run writes under out_dir/<stage>, stage "teacher" or the distillation method:
        # logs, checkpoints, plots and the exported network <stage>.pth.
        "out_dir": "runs/run",
        "seed": 0,
        # "auto" picks cuda when available (the local rank's GPU under torchrun), else cpu.
        "device": "auto",
        # Deterministic kernels and fixed thread count: resumed runs equal uninterrupted ones bit for bit.
        "deterministic": False,
        # torch intra-op threads; 0 keeps torch's default.
        "threads": 0,
    },
    "model": {
        # A preset of facd_fast.models.build, or a network of your own, "package.module:function",
        # called as function(scale=model.scale, **<student|teacher>_kwargs) (facd_fast.models.build_network).
        "student": "edsr-student",
        "teacher": "edsr-teacher",
        # Keyword arguments for the factory, or constructor overrides of a preset (num_block, num_feat, ...).
        "student_kwargs": {},
        "teacher_kwargs": {},
        # The feature taps: module names as named_modules() gives them (facd_fast.FeatureTaps); empty: a
        # preset's own taps (docs/models.md, "Feature taps"). A network of your own needs them for the feature terms.
        "student_taps": [],
        "teacher_taps": [],
        # The frozen teacher's weights (a state dict of the teacher, or any layout facd_fast.models.load_pretrained
        # reads for the presets); required to distil.
        "teacher_checkpoint": "",
        "scale": 4,
    },
    "data": {
        # A folder of HR training images, or "builtin" for the built-in real-photo set.
        "train_hr_dir": "",
        "train_lr_dir": "",
        # Validation images: a benchmark folder (Set5 layout or plain HR folder), or "builtin".
        "val_hr_dir": "",
        "val_lr_dir": "",
        # Where "builtin" photos are written.
        "builtin_root": "datasets/builtin",
        "cache_dir": "",
        # HR patch side; the LR patch is patch_size / scale.
        "patch_size": 192,
        "augment": True,
        # Each epoch visits every image `repeat` times (small folders give longer epochs).
        "repeat": 1,
        "num_workers": 0,
        # Validation during training on at most this many images (0: all), each centre-cropped
        # to at most val_crop HR pixels a side (0: whole images); final evaluation uses `facd eval`.
        "val_max_images": 0,
        "val_crop": 0,
    },
    "train": {
        "batch_size": 16,
        "iterations": 300000,
        "lr": 1e-4,
        # Step decay: lr is multiplied by lr_gamma every lr_step iterations.
        "lr_step": 200000,
        "lr_gamma": 0.5,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        # "auto": bf16 autocast on CUDA, off on CPU; "bf16": on everywhere; "off".
        "amp": "auto",
        "channels_last": True,
        "compile": False,
        # EMA of the student's weights; 0 disables it.
        "ema_decay": 0.0,
        "log_every": 100,
        # On log steps, also log the gradient norm each objective term sends into the student and its
        # cosine with the pixel term's (facd_fast.train.diagnostics; one extra backward pass per term).
        "grad_norms": True,
        "val_every": 5000,
        "checkpoint_every": 5000,
        # A step whose loss or gradient is NaN/Inf is skipped (the weights keep their last finite
        # values); this many such steps in a row stop the run with an error.
        "max_bad_steps": 20,
        "tensorboard": False,
        "progress": True,
        # End-of-run curves and visual comparison PNGs.
        "plots": True,
    },
    "distill": {
        "method": "facd",
        # alpha weighs the output distillation term L1(sr_s, sr_t) against L1(sr_s, hr).
        "alpha": 0.5,
        # lambda weighs the feature term (FACD, FD or FAKD), summed over taps with tap_weights.
        "lambda": 1.0,
        # lambda grows linearly from 0 to its value over the first lambda_warmup steps (0: constant).
        "lambda_warmup": 0,
        "tap_weights": [1.0, 1.0, 1.0],
        # "auto": the adaptive mask gates both distillation terms for facd only; true/false force it
        # for fd-l1/fd-l2/fakd (facd-nomask is always unmasked, none has nothing to gate).
        "use_mask": "auto",
        "margin_db": 0.0,
        # The feature distance (docs/loss.md, "One tap"): "auto" is l1 for facd/facd-nomask and the named
        # one for fd-l1/fd-l2; "l1"/"l2" set FACD's, and contradicting fd-l1/fd-l2 is an error.
        # none and fakd have no feature distance. normalize is the feature normalisation.
        "distance": "auto",
        "normalize": "channel",
        # Loss backend: "auto", "reference" or a fused backend name.
        "backend": "auto",
        # More loss terms, or other weights for the method's own ({"name" = weight}; 0 removes a term): a
        # registered term (facd_fast.train.terms), or "package.module:function" whose import registers it.
        "terms": {},
        # The frozen teacher's precision, apart from the student's train.amp: "auto" is bf16 where the
        # device computes it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16) and the teacher's
        # validation Y-PSNR stays within 0.02 dB of fp32's, else fp32 (facd_fast.train.precision).
        "teacher_precision": "auto",
    },
}

#: Keys whose value may take one of several types.
_ALTERNATIVE_TYPES = {("distill", "use_mask"): (bool, str)}
_CHOICES = {
    ("distill", "method"): METHODS,
    ("distill", "use_mask"): ("auto", True, False),
    ("train", "amp"): ("auto", "bf16", "off"),
    ("distill", "distance"): ("auto", "l1", "l2"),
    ("distill", "normalize"): ("channel", "none"),
    ("distill", "teacher_precision"): ("auto", "fp32", "bf16", "fp16"),
}


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key or has a value out of range."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type (a ConfigError, and a TypeError as every wrong type is)."""


def method_distance(method: str, distance: str) -> Optional[str]:
    """The feature distance ``method`` uses given ``distill.distance``: "l1", "l2" or None (none, fakd).

    fd-l1 and fd-l2 name their distance: "auto" or the same name is accepted, the
    other one raises (it would otherwise be ignored). facd and facd-nomask take
    ``distance``, "auto" meaning "l1" (docs/loss.md's default).
    """
    from .terms import TERMS

    if method not in METHODS:
        raise ConfigError(f"distill.method must be one of {list(METHODS)}, got {method!r}")
    if distance not in _CHOICES[("distill", "distance")]:
        raise ConfigError(f"distill.distance must be one of {list(_CHOICES[('distill', 'distance')])}, got {distance!r}")
    term = TERMS.get(method)
    if term is not None and term.distance is not None:
        if distance not in ("auto", term.distance):
            raise ConfigError(
                f"distill.distance = {distance!r} contradicts distill.method = {method!r}, whose name fixes "
                f"the distance to {term.distance!r}; use method fd-{distance}, or distance \"auto\""
            )
        return term.distance
    if term is not None and term.takes_distance:
        return "l1" if distance == "auto" else distance
    return None


def _check_value(section: str, key: str, value: Any) -> Any:
    default = DEFAULTS[section][key]
    allowed = _ALTERNATIVE_TYPES.get((section, key), (type(default),))
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigTypeError(f"{section}.{key} must be of type {names}, got {value!r} ({type(value).__name__})")
    if isinstance(default, list) and default:
        value = [float(v) if isinstance(default[0], float) and isinstance(v, int) else v for v in value]
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {list(choices)}, got {value!r}")
    return value


def _merge(config: Config, updates: Mapping[str, Any], origin: str) -> None:
    for section, values in updates.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{origin}: unknown section [{section}]; sections are {sorted(DEFAULTS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table of keys, got {values!r}")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(
                    f"{origin}: unknown key {section}.{key}; keys of [{section}] are {sorted(DEFAULTS[section])}"
                )
            config[section][key] = _check_value(section, key, value)


def parse_override(text: str) -> tuple:
    """``"train.batch_size=8"`` -> ``("train", "batch_size", 8)``.

    The value is read as a TOML value (``8``, ``1e-4``, ``true``, ``"x"``, ``[1, 2]``);
    a bare word that is not valid TOML is taken as a string (``model.student=edsr-demo-student``).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, got {dotted.strip()!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The defaults, updated by the TOML file at ``path`` (if any), then by each ``section.key=value`` override.

    ``path`` is a file, or the name of a shipped config (``"edsr_x4"``, see :func:`facd_fast.resources.config_path`).
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = config_path(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
        _merge(config, data, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(config, {section: {key: value}}, f"--set {text}")
    validate_config(config)
    return config


# Keys checked by range: (section, key) -> (least, greatest, whether the least is allowed, whether the greatest is).
_INT_RANGES = {
    ("run", "seed"): (0, 2**32 - 1),  # numpy's global seed takes 32 bits
    ("run", "threads"): (0, None),
    ("data", "patch_size"): (1, None),
    ("data", "repeat"): (1, None),
    ("data", "num_workers"): (0, None),
    ("data", "val_max_images"): (0, None),
    ("data", "val_crop"): (0, None),
    ("train", "batch_size"): (1, None),
    ("train", "iterations"): (1, None),
    ("train", "lr_step"): (1, None),
    ("train", "log_every"): (1, None),
    ("train", "val_every"): (1, None),
    ("train", "checkpoint_every"): (1, None),
    ("train", "max_bad_steps"): (1, None),
}
_FLOAT_RANGES = {
    ("train", "lr"): (0.0, None, False, True),
    ("train", "lr_gamma"): (0.0, None, False, True),
    ("train", "weight_decay"): (0.0, None, True, True),
    ("train", "ema_decay"): (0.0, 1.0, True, False),
    ("distill", "alpha"): (0.0, 1.0, True, True),
    ("distill", "lambda"): (0.0, None, True, True),
    ("distill", "margin_db"): (None, None, True, True),
}


def _check_number(name: str, value, low, high, low_in: bool = True, high_in: bool = True) -> None:
    """:func:`facd_fast.checks.check_real` (or ``check_int`` for an int key's bounds), its errors as config errors."""
    try:
        if isinstance(low, int) and not isinstance(low, bool) and (high is None or isinstance(high, int)):
            check_int(name, value, low, high)
        else:
            check_real(name, value, low, high, least_inclusive=low_in, greatest_inclusive=high_in)
    except TypeError as error:
        raise ConfigTypeError(str(error)) from None
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_device(name: str, value: str) -> None:
    """ConfigError unless ``value`` is "auto" or a device this machine has ("cpu", "cuda", "cuda:1", ...)."""
    import torch

    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{name} must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {value!r}") from None
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    if device.type != "cuda" and (module is None or not hasattr(module, "is_available")):
        raise ConfigError(f"{name}={value!r}: device type {device.type!r} is not supported; use \"cpu\" or \"cuda\"")
    if not module.is_available():
        raise ConfigError(f"{name}={value!r}: this machine or torch build has no {device.type} device "
                          f"(torch.{device.type}.is_available() is False); use \"cpu\" or \"auto\"")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"{name}={value!r}: there are only {count} {device.type} device(s)")


def validate_config(config: Config, mode: str | None = None) -> None:
    """Check every key's type and range, naming the key: ConfigError on the first bad value.

    ``mode`` ("teacher" or "distill") adds the checks that depend on what is trained.
    """
    from ..api import BACKENDS
    from ..models import PRESETS, is_factory_spec

    for section, values in DEFAULTS.items():
        if section not in config:
            raise ConfigError(f"config lacks the section [{section}]")
        for key in values:
            if key not in config[section]:
                raise ConfigError(f"config lacks the key {section}.{key}")
            _check_value(section, key, config[section][key])
    for (section, key), (low, high) in _INT_RANGES.items():
        _check_number(f"{section}.{key}", config[section][key], low, high)
    for (section, key), bounds in _FLOAT_RANGES.items():
        _check_number(f"{section}.{key}", config[section][key], *bounds)
    run, model, data, train, distill = (config[name] for name in ("run", "model", "data", "train", "distill"))
    if not run["out_dir"]:
        raise ConfigError("run.out_dir must name a folder, got an empty string")
    check_device("run.device", run["device"])
    for key in ("student", "teacher"):
        if model[key] not in PRESETS and not is_factory_spec(model[key]):
            raise ConfigError(f"model.{key} must be a preset of {sorted(PRESETS)} or a network of your own, "
                              f"\"package.module:function\", got {model[key]!r}")
        for index, name in enumerate(model[f"{key}_taps"]):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"model.{key}_taps[{index}] must be a module name (a non-empty string), got {name!r}")
        for name in model[f"{key}_kwargs"]:
            if not name.isidentifier():
                raise ConfigError(f"model.{key}_kwargs: {name!r} is not a keyword argument name")
    try:
        scale = check_scale("model.scale", model["scale"])
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if data["patch_size"] % scale:
        raise ConfigError(f"data.patch_size must be a multiple of model.scale = {scale}, got {data['patch_size']}")
    if data["val_crop"] and data["val_crop"] <= 2 * scale:
        raise ConfigError(f"data.val_crop must be 0 (whole images) or more than 2 x model.scale = {2 * scale} "
                          f"(PSNR crops a {scale}-pixel border), got {data['val_crop']}")
    betas = train["betas"]
    if len(betas) != 2:
        raise ConfigError(f"train.betas must hold two numbers, got {betas!r}")
    for index, beta in enumerate(betas):
        _check_number(f"train.betas[{index}]", beta, 0.0, 1.0, True, False)
    weights = distill["tap_weights"]
    if not weights:
        raise ConfigError("distill.tap_weights must hold one weight per tap, got an empty list")
    for index, weight in enumerate(weights):
        _check_number(f"distill.tap_weights[{index}]", weight, 0.0, None)
    if mode == "distill" and distill["method"] in ("facd", "facd-nomask") and train["batch_size"] < 2:
        raise ConfigError(f"train.batch_size must be >= 2 for distill.method = {distill['method']!r} "
                          f"(the other patches of the batch are the negatives), got {train['batch_size']}")
    method_distance(distill["method"], distill["distance"])
    for name, weight in distill["terms"].items():
        _check_number(f"distill.terms.{name}", weight, 0.0, None)
    if distill["backend"] not in BACKENDS:
        raise ConfigError(f"distill.backend must be one of {list(BACKENDS)}, got {distill['backend']!r}")
