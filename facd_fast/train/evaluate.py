"""``facd eval``: Y-PSNR / SSIM of a model on a benchmark folder, by the protocol of docs/training.md, "Evaluation"."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .. import data as sr_data
from .. import metrics, models
from ..deploy import receptive_radius, super_resolve
from ..resources import resolve_path
from .data_folders import check_folder
from .training_state import TRAINING_STATE_KEY


def load_model(path: str | Path, *, preset: Optional[str] = None, scale: Optional[int] = None, ema: bool = False) -> nn.Module:
    """The network in ``path``: an exported model (ours or foreign) or a trainer checkpoint (its trained network).

    The architecture comes from the file (recorded by us, or inferred from a
    foreign file's key names and shapes), or from ``preset`` (a preset name, or "package.module:function"
    called with scale= and the kwargs the file records); a file whose
    weights do not fit raises with the missing and unexpected keys; a missing,
    empty, truncated or foreign file, or weights holding NaN/Inf, raise naming
    the file. ``ema`` picks a trainer checkpoint's EMA weights. ``package:REL`` names a file shipped in
    the package (:func:`facd_fast.resources.resolve_path`).
    """
    path = resolve_path(path)
    state = models.read_checkpoint(path)
    if state.get(TRAINING_STATE_KEY):
        if ema and state["ema"] is None:
            raise ValueError(f"{str(path)!r} holds no EMA weights (the run had train.ema_decay = 0)")
        weights = state["ema"] if ema else state["model"]
        models.check_finite(weights, f"checkpoint {path}")
        state = models.model_file_dict(weights, state["model_meta"])
    elif ema:
        raise ValueError(f"--ema needs a trainer checkpoint, {str(path)!r} is a model file")
    try:
        return models.model_from_checkpoint(state, preset=preset, scale=scale, source=f"checkpoint {path}")
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"checkpoint {path}: {error}") from error


#: The version of the protocol :func:`evaluate` follows. Bump it when evaluate() or the metrics it calls
#: give other numbers for the same network and images: results recorded under another version
#: (``facd study``'s result.json) are then computed again instead of reused.
PROTOCOL_VERSION = 1


def evaluation_protocol(scale: int, *, self_ensemble: bool = False, tile: Optional[int] = None,
                        tile_overlap: Optional[int] = None) -> Dict[str, Any]:
    """What :func:`evaluate`'s numbers depend on besides the network and the images, as a JSON-able dict.

    ``{"version", "scale", "crop_border", "channel", "self_ensemble", "tile", "tile_overlap"}``: the border
    cropped before scoring is ``scale`` pixels and the channel scored is Y, as :func:`evaluate` does.
    """
    return {"version": PROTOCOL_VERSION, "scale": scale, "crop_border": scale, "channel": "y",
            "self_ensemble": self_ensemble, "tile": tile, "tile_overlap": tile_overlap}


@torch.no_grad()
def evaluate(
    network: Optional[nn.Module],
    folder,
    scale: int,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    label: str = "eval",
    self_ensemble: bool = False,
    tile: Optional[int] = None,
    tile_overlap: Optional[int] = None,
) -> Dict[str, Any]:
    """Per-image and mean Y-PSNR/SSIM of ``network`` (None: bicubic upsampling) on a :class:`BenchmarkFolder`.

    Outputs are clamped, quantised to uint8 and compared on Y with ``scale``
    pixels of border cropped (:func:`facd_fast.metrics.psnr_y`, :func:`ssim_y`).
    ``self_ensemble`` (x8 flips/rotations) and ``tile`` / ``tile_overlap`` run
    the network through :func:`facd_fast.deploy.super_resolve`.
    Returns ``{"mean_psnr_y", "mean_ssim_y", "images": [{"name", "psnr_y", "ssim_y"}, ...],
    "self_ensemble", "tile", "tile_overlap", "skipped"}`` (``self_ensemble``, ``tile`` and
    ``tile_overlap`` say how the outputs were made; ``tile_overlap`` is the overlap used, None
    untiled; ``skipped`` lists ``{"file", "reason"}`` of the folder's unreadable files, when it
    was told to skip them).
    """
    from tqdm.auto import tqdm

    if network is not None:
        network = network.to(device).eval()
    images = []
    for name, lr, hr in tqdm(folder, desc=label, unit="img", disable=not progress, leave=False):
        if network is None:
            sr = sr_data.imresize(lr[None], scale)[0]
        else:
            sr = super_resolve(network, lr[None].to(device), tile=tile, tile_overlap=tile_overlap,
                               ensemble=self_ensemble).float()[0].cpu()
        sr_uint8, hr_uint8 = metrics.to_uint8_image(sr), metrics.to_uint8_image(hr)
        images.append({
            "name": name,
            "psnr_y": metrics.psnr_y(sr_uint8, hr_uint8, scale),
            "ssim_y": metrics.ssim_y(sr_uint8, hr_uint8, scale),
        })
    if not images:
        raise ValueError("the benchmark folder holds no images")
    return {
        "mean_psnr_y": sum(i["psnr_y"] for i in images) / len(images),
        "mean_ssim_y": sum(i["ssim_y"] for i in images) / len(images),
        "images": images,
        "self_ensemble": bool(self_ensemble and network is not None),
        "tile": tile if network is not None else None,
        "tile_overlap": None if tile is None or network is None else
        (receptive_radius(network) if tile_overlap is None else tile_overlap),
        "skipped": list(getattr(folder, "skipped", [])),
    }


def open_benchmark(hr_dir: str | Path, scale: int, lr_dir: Optional[str | Path] = None, *,
                   skip_unreadable: bool = False):
    """A :class:`facd_fast.data.BenchmarkFolder`, with a clear error when the folder is missing."""
    check_folder("--hr-dir", str(hr_dir))
    if lr_dir is not None:
        check_folder("--lr-dir", str(lr_dir))
    return sr_data.BenchmarkFolder(hr_dir, scale, lr_dir=lr_dir, skip_unreadable=skip_unreadable)
