"""In-training validation: centre crops of the validation images, scored on Y as the exact protocol does."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from .. import metrics
from .config import Config
from .precision import autocast_for


def center_crop_pair(lr: Tensor, hr: Tensor, scale: int, hr_size: int) -> Tuple[Tensor, Tensor]:
    """The centre crop of at most ``hr_size`` HR pixels a side (0: no crop), LR cropped to match."""
    if hr_size <= 0:
        return lr, hr
    lr_size = hr_size // scale
    top, left = max(0, (lr.shape[-2] - lr_size) // 2), max(0, (lr.shape[-1] - lr_size) // 2)
    lr = lr[..., top:top + lr_size, left:left + lr_size]
    return lr, hr[..., top * scale:(top + lr.shape[-2]) * scale, left * scale:(left + lr.shape[-1]) * scale]


def validation_pairs(val_set, config: Config) -> List[Tuple[Tensor, Tensor]]:
    """(lr, hr) of the first ``data.val_max_images`` validation images (0: all), centre-cropped to ``data.val_crop``."""
    data, scale = config["data"], config["model"]["scale"]
    pairs = []
    for index, (_, lr, hr) in enumerate(val_set):
        if data["val_max_images"] and index >= data["val_max_images"]:
            break
        pairs.append(center_crop_pair(lr, hr, scale, data["val_crop"]))
    return pairs


@torch.no_grad()
def validation_psnr(network: nn.Module, pairs, device: torch.device, config: Config) -> float:
    """Mean Y-PSNR of ``network`` on ``pairs``, run under the student's ``train.amp``, in eval mode."""
    scale = config["model"]["scale"]
    was_training = network.training
    network.eval()
    psnrs = []
    for lr, hr in pairs:
        with autocast_for(device, config["train"]["amp"]):
            sr = network(lr[None].to(device))
        psnrs.append(metrics.psnr_y_torch(sr.float().cpu(), hr[None], crop_border=scale))
    network.train(was_training)
    return float(torch.cat(psnrs).mean())
