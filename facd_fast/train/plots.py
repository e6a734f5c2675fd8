"""End-of-run figures: training curves and a visual comparison of crops."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from .. import data as sr_data
from .. import metrics
from .run_log import read_log


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Dict[str, Path], out_png: Path) -> Path:
    """Training loss and validation Y-PSNR against steps, one line per run.

    Args:
        runs: label -> the run's ``log.jsonl``.
        out_png: where the figure goes.
    """
    plt = _pyplot()
    figure, (loss_axis, psnr_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, log_path in runs.items():
        train = list(read_log(log_path, "train"))
        val = list(read_log(log_path, "val"))
        if train:
            loss_axis.plot([r["step"] for r in train], [r["l1_hr"] for r in train], label=label)
        if val:
            psnr_axis.plot([r["step"] for r in val], [r["val_psnr_y"] for r in val], marker="o", label=label)
    loss_axis.set(xlabel="step", ylabel="L1(sr, hr)", title="training loss", yscale="log")
    psnr_axis.set(xlabel="step", ylabel="Y-PSNR (dB)", title="validation")
    for axis in (loss_axis, psnr_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


@torch.no_grad()
def super_resolve(network: torch.nn.Module, lr: Tensor) -> Tensor:
    """(3, h, w) float LR -> (3, h*s, w*s) float SR in [0, 1], on the network's device, returned on CPU."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    sr = network(lr[None].to(device)).float().clamp(0, 1)[0].cpu()
    network.train(was_training)
    return sr


def plot_comparison(lr: Tensor, hr: Tensor, outputs: Dict[str, Tensor], scale: int, out_png: Path, crop: int = 96) -> Path:
    """Side by side crops of bicubic, each network's output and HR, titled with their Y-PSNR on the whole image.

    Args:
        lr: (3, h, w) float in [0, 1]; hr: (3, h*scale, w*scale).
        outputs: label -> (3, H, W) SR image in [0, 1].
        crop: HR side of the shown crop, taken around the image's most detailed region.
    """
    plt = _pyplot()
    bicubic = sr_data.imresize(lr[None], scale)[0].clamp(0, 1)
    panels = {"bicubic": bicubic, **outputs, "HR": hr}
    top, left = _busiest_window(hr, crop)
    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    hr_uint8 = metrics.to_uint8_image(hr)
    for axis, (label, image) in zip(np.atleast_1d(axes), panels.items()):
        image_uint8 = metrics.to_uint8_image(image)
        title = label if label == "HR" else f"{label}\n{metrics.psnr_y(image_uint8, hr_uint8, scale):.2f} dB"
        axis.imshow(image_uint8[top:top + crop, left:left + crop], interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


def _busiest_window(hr: Tensor, crop: int) -> tuple:
    """Top-left corner of the crop x crop window with the most gradient energy (where SR methods differ)."""
    gray = hr.mean(0)
    crop = min(crop, gray.shape[0], gray.shape[1])
    energy = (gray[1:, :-1] - gray[:-1, :-1]).abs() + (gray[:-1, 1:] - gray[:-1, :-1]).abs()
    pooled = torch.nn.functional.avg_pool2d(energy[None, None], crop - 1, stride=max(1, crop // 4))[0, 0]
    row, col = divmod(int(pooled.argmax()), pooled.shape[1])
    return row * max(1, crop // 4), col * max(1, crop // 4)


def plot_run(trainer) -> List[Path]:
    """The figures of one finished run: its curves, and a comparison on its first validation image."""
    written = [plot_curves({trainer.stage: trainer.log.path}, trainer.out_dir / "curves.png")]
    if trainer.val_set is not None and len(trainer.val_set):
        _, lr, hr = trainer.val_set[0]
        outputs = {trainer.stage: super_resolve(trainer.eval_network, lr)}
        if trainer.teacher is not None:  # in its precision, as the run used it (Distiller.teacher_forward)
            outputs["teacher"] = trainer.model.teacher_forward(lr[None].to(trainer.device))[0].float().clamp(0, 1)[0].cpu()
        written.append(plot_comparison(lr, hr, outputs, trainer.config["model"]["scale"], trainer.out_dir / "comparison.png"))
    return written

