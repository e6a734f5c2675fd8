"""Checkpoint import and export.

Layouts read (detected from the key names):

- ours / BasicSR: ``conv_first``, ``body.N.conv1``, ``body.G.residual_group.B.rcab...``,
  ``conv_after_body``, ``upsample.K``, ``conv_last``; a file may wrap them in
  ``params_ema`` / ``params`` (BasicSR) and prefix ``module.`` (DataParallel)
  or ``_orig_mod.`` (torch.compile).
- EDSR-PyTorch (sanghyun-son/EDSR-PyTorch): ``head.0``, ``body.i.body.{0,2}``,
  ``body.N`` (closing conv), ``tail.0.K``, ``tail.1``, ``sub_mean`` / ``add_mean``.
- official RCAN (yulunzhang/RCAN): ``head.0``, ``body.g.body.b.body.{0,2}``,
  ``body.g.body.b.body.3.conv_du.{0,2}``, ``body.g.body.M`` (group conv),
  ``body.G`` (closing conv), ``tail.0.K``, ``tail.1``, ``sub_mean`` / ``add_mean``.

The foreign layouts fold the mean shift into 1x1 convs (``sub_mean`` /
``add_mean``); they are checked against our fixed mean shift and dropped.
Export writes BasicSR's layout plus a ``facd_fast`` entry recording the architecture.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic_files import atomic_write
from ..taps import bare_network
from .factory import build_network, factory_record, is_factory_spec
from .network import DIV2K_RGB_MEAN, ResidualSRNetwork
from .presets import ARCHS, PRESETS, from_config

METADATA_KEY = "facd_fast"
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")

# (pattern on a foreign key, replacement in BasicSR's names); first match wins.
_EDSR_PYTORCH_TO_BASICSR = [
    (r"head\.0\.", "conv_first."),
    (r"body\.(\d+)\.body\.0\.", r"body.\1.conv1."),
    (r"body\.(\d+)\.body\.2\.", r"body.\1.conv2."),
    (r"body\.(\d+)\.(weight|bias)$", r"conv_after_body.\2"),
    (r"tail\.0\.(\d+)\.", r"upsample.\1."),
    (r"tail\.1\.", "conv_last."),
]
_RCAN_TO_BASICSR = [
    (r"head\.0\.", "conv_first."),
    (r"body\.(\d+)\.body\.(\d+)\.body\.([02])\.", r"body.\1.residual_group.\2.rcab.\3."),
    (r"body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.0\.", r"body.\1.residual_group.\2.rcab.3.attention.1."),
    (r"body\.(\d+)\.body\.(\d+)\.body\.3\.conv_du\.2\.", r"body.\1.residual_group.\2.rcab.3.attention.3."),
    (r"body\.(\d+)\.body\.(\d+)\.(weight|bias)$", r"body.\1.conv.\3"),
    (r"body\.(\d+)\.(weight|bias)$", r"conv_after_body.\2"),
    (r"tail\.0\.(\d+)\.", r"upsample.\1."),
    (r"tail\.1\.", "conv_last."),
]


def _numpy_globals() -> list:
    """The numpy objects a trainer checkpoint's RNG states pickle (arrays and dtypes), allowed by weights_only loading.

    The array constructor moved from numpy.core to numpy._core in numpy 2; files
    written under either name are accepted.
    """
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    reconstruct = multiarray._reconstruct
    dtype_classes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)}
    return [reconstruct, np.ndarray, np.dtype, *dtype_classes,
            *((reconstruct, f"{name}.multiarray._reconstruct") for name in ("numpy.core", "numpy._core"))]


def _load_failure(error: BaseException) -> str:
    """The one line of torch's (often multi-paragraph) load error that says what was wrong."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:")[-1].strip()
            return detail or (lines[index + 1] if index + 1 < len(lines) else lines[0])
    return lines[0] if lines else type(error).__name__


def read_checkpoint(path) -> Mapping:
    """The mapping stored in a ``.pth``/``.pt`` file, read without running arbitrary pickled code.

    Raises FileNotFoundError for a missing file and ValueError naming the file
    for a folder, an empty, truncated or foreign file, or one that holds no mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # torch raises several types for a truncated, corrupt or foreign file
        raise ValueError(f"cannot read checkpoint {path}: not a complete PyTorch checkpoint, or one that "
                         f"holds more than tensors and plain data ({_load_failure(error)})") from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"cannot read checkpoint {path}: it holds a {type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint


def check_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """ValueError naming ``source`` and the first tensor holding NaN or Inf: such weights come from a diverged run."""
    for key, value in tensors.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source} holds non-finite weights: {key} has {bad} NaN/Inf value(s) of "
                             f"{value.numel()} (a diverged run?)")


def _read(path_or_state_dict) -> tuple[Mapping, str]:
    """(the checkpoint mapping, how to name it in errors)."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict, "the checkpoint"
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError(f"path_or_state_dict must be a path or a state dict, got {type(path_or_state_dict).__name__}")
    return read_checkpoint(path_or_state_dict), f"checkpoint {Path(path_or_state_dict)}"


def _strip_wrapper_prefixes(key: str) -> str:
    """Drop DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _unwrap(checkpoint: Mapping, param_key: str | None = None,
            source: str = "the checkpoint") -> tuple[dict[str, Tensor], dict | None]:
    """The tensors of a checkpoint and our metadata.

    The tensors are the entry ``param_key``, or by default the first of
    params_ema, params, state_dict, model present, or the top level;
    wrapper prefixes are stripped. Non-finite weights raise, naming ``source``.
    """
    metadata = checkpoint.get(METADATA_KEY)
    if param_key is not None:
        if not isinstance(checkpoint.get(param_key), Mapping):
            raise ValueError(f"{source} has no entry {param_key!r}; "
                             f"top-level keys: {sorted(map(str, checkpoint))[:10]}")
        state = checkpoint[param_key]
    else:
        state = next((checkpoint[key] for key in _WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)),
                     checkpoint)
    tensors = {_strip_wrapper_prefixes(key): value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise ValueError(f"{source} holds no tensors (top-level keys: {sorted(map(str, checkpoint))[:10]})")
    check_finite(tensors, source)
    return tensors, metadata


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"basicsr"`` (also ours), ``"edsr-pytorch"`` or ``"rcan-official"``."""
    keys = list(state_dict)
    if any(key.startswith("head.0.") for key in keys):
        return "rcan-official" if any(".conv_du." in key for key in keys) else "edsr-pytorch"
    if "conv_first.weight" in state_dict:
        return "basicsr"
    raise ValueError(f"unrecognised checkpoint layout; first keys: {keys[:8]}")


def _check_mean_shift(state_dict: Mapping[str, Tensor], rgb_mean, img_range: float) -> None:
    """EDSR-PyTorch's sub_mean/add_mean must equal our fixed shift, else outputs would silently differ."""
    expected = torch.tensor(rgb_mean, dtype=torch.float64) * img_range
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
        bias = state_dict.get(f"{name}.bias")
        weight = state_dict.get(f"{name}.weight")
        if bias is None:
            continue
        eye = torch.eye(len(rgb_mean), dtype=torch.float64).view(len(rgb_mean), len(rgb_mean), 1, 1)
        if not torch.allclose(bias.double(), sign * expected, atol=1e-3) or (
                weight is not None and not torch.allclose(weight.double(), eye, atol=1e-6)):
            raise ValueError(f"checkpoint's {name} (bias {bias.tolist()}) is not the mean shift of the model "
                             f"(rgb_mean {list(rgb_mean)}, img_range {img_range}, std 1); it cannot load unchanged")


def to_basicsr_keys(state_dict: Mapping[str, Tensor], *, rgb_mean=None, img_range: float = 255.0) -> dict[str, Tensor]:
    """A state dict in any known layout, renamed to BasicSR's keys (sub_mean/add_mean checked and dropped)."""
    layout = detect_layout(state_dict)
    if layout == "basicsr":
        return dict(state_dict)
    _check_mean_shift(state_dict, DIV2K_RGB_MEAN if rgb_mean is None else rgb_mean, img_range)
    rules = _RCAN_TO_BASICSR if layout == "rcan-official" else _EDSR_PYTORCH_TO_BASICSR
    converted = {}
    for key, value in state_dict.items():
        if key.split(".")[0] in ("sub_mean", "add_mean"):
            continue
        for pattern, replacement in rules:
            new_key, found = re.subn("^" + pattern, replacement, key)
            if found:
                converted[new_key] = value
                break
        else:
            converted[key] = value  # left as is: reported as unexpected if the model lacks it
    return converted


def _mismatch_message(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                         for key in set(own) & set(state) if own[key].shape != state[key].shape)
    parts = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
        if keys:
            parts.append(f"{title} ({len(keys)}): {', '.join(keys)}")
    return "; ".join(parts)


def load_pretrained(model: nn.Module, path_or_state_dict, strict: bool = True,
                    param_key: str | None = None) -> dict[str, list[str]]:
    """Load a checkpoint in any known layout into ``model``.

    ``param_key`` picks an entry of a wrapped file (e.g. "params" where the
    default would take "params_ema"). strict=True: any missing, unexpected or mis-shaped key raises ValueError
    listing them all. strict=False: loads the keys that fit and returns
    ``{"missing": [...], "unexpected": [...]}``.
    """
    checkpoint, source = _read(path_or_state_dict)
    tensors, _ = _unwrap(checkpoint, param_key, source)
    return _load_tensors(model, tensors, strict, source)


def _load_tensors(model: nn.Module, tensors: Mapping[str, Tensor], strict: bool, source: str) -> dict[str, list[str]]:
    model = bare_network(model)
    # The layout conversions are for EDSR / RCAN files; a user's own network loads its own state dict.
    state = (to_basicsr_keys(tensors, rgb_mean=model.rgb_mean, img_range=model.img_range)
             if isinstance(model, ResidualSRNetwork) else dict(tensors))
    message = _mismatch_message(model, state)
    if message and strict:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {message}")
    own = model.state_dict()
    fitting = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    result = model.load_state_dict(fitting, strict=False)
    return {"missing": sorted(result.missing_keys), "unexpected": sorted(set(state) - set(fitting))}


def model_meta(model: nn.Module) -> dict:
    """Our architecture record of a network, enough to rebuild it: ``{"arch", "config", "scale"}`` for
    EDSR / RCAN, ``{"factory", "kwargs", "scale"}`` for a network a factory made (:func:`build_network`)."""
    model = bare_network(model)
    record = factory_record(model)
    if record is not None:
        return dict(record)
    if not isinstance(model, ResidualSRNetwork):
        raise ValueError(f"cannot record the architecture of a {type(model).__name__}: build it with "
                         f"facd_fast.models.build_network(\"package.module:function\", scale)")
    return {"arch": model.arch, "config": model.config(), "scale": model.scale}


def model_file_dict(weights: Mapping[str, Tensor], meta: dict) -> dict:
    """The in-memory form of an exported model file: BasicSR ``params`` plus our architecture record."""
    return {"params": weights, METADATA_KEY: meta}


def save_checkpoint_basicsr(model: nn.Module, path) -> Path:
    """Write ``{"params": state_dict, "facd_fast": {"arch", "config", "scale"}}`` atomically.

    Weights holding NaN or Inf are refused (ValueError) and nothing is written.
    """
    model = bare_network(model)
    path = Path(path)
    params = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    check_finite(params, f"refusing to write {path}: the model")
    payload = model_file_dict(params, model_meta(model))
    atomic_write(path, lambda file: torch.save(payload, file))
    return path


def _indices(keys, pattern: str) -> set[int]:
    return {int(match.group(1)) for key in keys if (match := re.match(pattern, key))}


def infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    """The architecture of a BasicSR-named state dict, from its key names and tensor shapes.

    res_scale is not stored in weights: it is taken from the preset with the
    same shape when there is one (0.1 for the EDSR teacher), else 1.
    """
    keys = list(state_dict)
    is_rcan = any(".residual_group." in key for key in keys)
    needed = ["conv_first.weight", "conv_last.weight"]
    needed += ["body.0.residual_group.0.rcab.3.attention.1.weight"] if is_rcan else []
    absent = [key for key in needed if key not in state_dict]
    if absent:
        raise ValueError(f"cannot infer the architecture: the checkpoint lacks {absent}")
    num_feat, num_in_ch = state_dict["conv_first.weight"].shape[:2]
    upsample_convs = sorted(_indices(keys, r"upsample\.(\d+)\.weight"))
    if not upsample_convs:
        raise ValueError("cannot infer the scale: the checkpoint has no upsample.K.weight")
    growth = state_dict[f"upsample.{upsample_convs[0]}.weight"].shape[0] // num_feat
    scale = 3 if growth == 9 else 2 ** len(upsample_convs)
    config = {"scale": scale, "num_feat": int(num_feat), "num_in_ch": int(num_in_ch),
              "num_out_ch": int(state_dict["conv_last.weight"].shape[0])}
    if is_rcan:
        squeezed = state_dict["body.0.residual_group.0.rcab.3.attention.1.weight"].shape[0]
        config.update(arch="rcan", num_group=len(_indices(keys, r"body\.(\d+)\.conv\.weight")),
                      num_block=len(_indices(keys, r"body\.0\.residual_group\.(\d+)\.rcab\.0\.weight")),
                      reduction=int(num_feat // squeezed))
    else:
        config.update(arch="edsr", num_block=len(_indices(keys, r"body\.(\d+)\.conv1\.weight")))
    shape_keys = [key for key in ("num_feat", "num_block", "num_group", "reduction") if key in config]
    for name, (arch, kwargs) in PRESETS.items():
        if arch == config["arch"] and all(kwargs.get(key, config[key]) == config[key] for key in shape_keys):
            config.update(res_scale=kwargs.get("res_scale", 1.0), preset=name)
            break
    else:
        config.update(res_scale=1.0, preset=None)
    return config


_ARCHITECTURE_KEYS = ("arch", "scale", "num_feat", "num_block", "num_group", "reduction", "res_scale")


def model_from_checkpoint(path_or_state_dict, preset: str | None = None, scale: int | None = None,
                          param_key: str | None = None, *, source: str | None = None) -> nn.Module:
    """Build the network a checkpoint holds and load it.

    The architecture is ``preset`` when given (a preset name or "package.module:function", at
    ``scale``, or the scale read from the weights; it must agree with the file's own record if there
    is one), else the one our metadata records, else the one inferred from the key names and tensor
    shapes. ``source`` names a state dict given in memory in errors (default "the checkpoint").
    """
    checkpoint, read_as = _read(path_or_state_dict)
    source = source or read_as
    try:
        return _model_from_tensors(*_unwrap(checkpoint, param_key, source), preset, scale, source)
    except ValueError as error:
        if source in str(error):
            raise
        raise ValueError(f"{source}: {error}") from error


def _factory_network(spec: str, metadata: dict | None, scale: int | None, source: str, given: bool) -> nn.Module:
    """The network of factory ``spec``, with the file's recorded kwargs and scale when it records the same factory."""
    recorded = metadata if isinstance(metadata, Mapping) and metadata.get("factory") == spec else {}
    if scale is not None and recorded and scale != recorded["scale"]:
        raise ValueError(f"scale={scale} disagrees with the checkpoint's recorded scale {recorded['scale']}")
    scale = scale if scale is not None else recorded.get("scale")
    if scale is None:
        raise ValueError(f"{spec} needs the scale: the file does not record it, give --scale")
    try:
        return build_network(spec, scale, recorded.get("kwargs"), what="--model" if given else f"{source} records model")
    except ValueError as error:
        if given:
            raise
        raise ValueError(f"{error}; or pass --model package.module:function naming where the network is "
                         f"defined now") from None


def _model_from_tensors(tensors: dict[str, Tensor], metadata: dict | None, preset: str | None,
                        scale: int | None, source: str) -> nn.Module:
    recorded = metadata.get("config") if isinstance(metadata, Mapping) else None
    if preset is not None and is_factory_spec(preset):
        model = _factory_network(preset, metadata, scale, source, given=True)
        _load_tensors(model, tensors, True, source)
        return model
    if preset is None and isinstance(metadata, Mapping) and "factory" in metadata:
        model = _factory_network(metadata["factory"], metadata, scale, source, given=False)
        _load_tensors(model, tensors, True, source)
        return model
    if preset is not None:
        model = build_network(preset, scale if scale is not None else infer_config(to_basicsr_keys(tensors))["scale"],
                              what="--model")
        _load_tensors(model, tensors, True, source)  # a different shape fails here, listing the keys
        if isinstance(recorded, Mapping):
            built = model.config()
            differences = [f"{key}: file {recorded.get(key)!r} vs preset {built.get(key)!r}"
                           for key in _ARCHITECTURE_KEYS if recorded.get(key) != built.get(key)]
            if differences:
                raise ValueError(f"the checkpoint records another architecture than preset {preset!r}: "
                                 + "; ".join(differences))
        return model
    if isinstance(recorded, Mapping):
        if scale is not None and scale != recorded["scale"]:
            raise ValueError(f"scale={scale} disagrees with the checkpoint's recorded scale {recorded['scale']}")
        model = from_config(dict(recorded))
    else:
        config = infer_config(to_basicsr_keys(tensors))
        if scale is not None and scale != config["scale"]:
            raise ValueError(f"scale={scale} disagrees with the scale {config['scale']} read from the weights")
        model = ARCHS[config.pop("arch")](**config)
    _load_tensors(model, tensors, True, source)
    return model
