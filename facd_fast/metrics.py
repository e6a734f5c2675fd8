"""PSNR and SSIM on the Y channel, by the BasicSR protocol with test_y_channel=True (docs/training.md, "Evaluation").

An image is clamped to [0, 1] and quantised to uint8 (round half to even, as
numpy and torch round), ``crop_border`` pixels are cut from each edge, and
Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 is computed on the 0..255
values without rounding. PSNR = 10 log10(255^2 / MSE) in float64; SSIM uses
an 11x11 Gaussian window (sigma 1.5) in 'valid' mode with C1 = (0.01*255)^2,
C2 = (0.03*255)^2, as BasicSR's ``_ssim``. BasicSR passes Y through float32;
we stay in float64, a difference below 1e-5 dB.

``psnr_y`` / ``ssim_y`` (numpy) give the reported numbers; ``psnr_y_torch``
is the batched version for validation during training and agrees with
``psnr_y`` of ``to_uint8_image`` to 1e-4 dB (both quantise the same way).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def min_eval_size(scale: int) -> int:
    """The smallest HR side (after cropping to a multiple of ``scale``) that Y-PSNR/SSIM at x``scale`` can score:
    an 11x11 SSIM window inside the ``scale``-pixel border."""
    return SSIM_WINDOW + 2 * scale


def _check_crop_border(crop_border, height: int, width: int) -> int:
    if isinstance(crop_border, bool) or not isinstance(crop_border, numbers.Integral) or crop_border < 0:
        raise ValueError(f"crop_border must be an int >= 0, got {crop_border!r}")
    if 2 * crop_border >= min(height, width):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {height}x{width} image")
    return int(crop_border)


def _check_uint8_pair(sr, hr) -> None:
    for name, image in (("sr", sr), ("hr", hr)):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} must be a uint8 RGB array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {sr.shape} and {hr.shape}")


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB on 0..255 (uint8 or float) -> (H, W) float64 Y of ITU-R BT.601, not rounded."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an (H, W, 3) numpy array, got {getattr(image, 'shape', type(image))}")
    return image.astype(np.float64) @ (np.array(Y_WEIGHTS) / 255.0) + Y_OFFSET


def _cropped_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    _check_uint8_pair(sr, hr)
    c = _check_crop_border(crop_border, *sr.shape[:2])
    window = (slice(c, sr.shape[0] - c), slice(c, sr.shape[1] - c))
    return rgb_to_y(sr[window]), rgb_to_y(hr[window])


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """Y-channel PSNR in dB of two uint8 (H, W, 3) RGB images; inf when they are equal."""
    y_sr, y_hr = _cropped_y(sr, hr, crop_border)
    mse = np.mean((y_sr - y_hr) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0 * 255.0 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size,) float64 normalised Gaussian, as cv2.getGaussianKernel(size, sigma)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'valid' 2-D correlation with the separable window outer(kernel, kernel)."""
    size = len(kernel)
    rows = sum(kernel[i] * image[i:image.shape[0] - size + 1 + i] for i in range(size))
    return sum(kernel[j] * rows[:, j:rows.shape[1] - size + 1 + j] for j in range(size))


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """Y-channel SSIM of two uint8 (H, W, 3) RGB images (needs >= 11x11 pixels after cropping)."""
    y_sr, y_hr = _cropped_y(sr, hr, crop_border)
    if min(y_sr.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, got {y_sr.shape}")
    kernel = gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _filter_valid(y_sr, kernel), _filter_valid(y_hr, kernel)
    sigma1_sq = _filter_valid(y_sr * y_sr, kernel) - mu1 ** 2
    sigma2_sq = _filter_valid(y_hr * y_hr, kernel) - mu2 ** 2
    sigma12 = _filter_valid(y_sr * y_hr, kernel) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (sigma1_sq + sigma2_sq + c2))
    return float(ssim_map.mean())


def _quantise(images: Tensor) -> Tensor:
    """Float images in [0, 1] -> float64 integer levels 0..255 (clamped, rounded).

    The product is taken in float32, as BasicSR's tensor2img does, so that a
    value on a rounding boundary lands on the same level.
    """
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.float64)


def to_uint8_image(image: Tensor) -> np.ndarray:
    """(3, H, W) float RGB in [0, 1] -> (H, W, 3) uint8 numpy array (clamped, rounded)."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor of shape (3, H, W), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
    return _quantise(image).permute(1, 2, 0).to(torch.uint8).cpu().numpy()


def psnr_y_torch(sr: Tensor, hr: Tensor, crop_border: int) -> Tensor:
    """Per-image Y PSNR (B,) float64 of float (B, 3, H, W) RGB in [0, 1], by the same protocol as ``psnr_y``."""
    for name, images in (("sr", sr), ("hr", hr)):
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4 \
                or images.shape[1] != 3:
            raise ValueError(f"{name} must be a float tensor (B, 3, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    c = _check_crop_border(crop_border, sr.shape[2], sr.shape[3])
    weights = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=sr.device).view(1, 3, 1, 1) / 255.0
    window = (slice(None), slice(None), slice(c, sr.shape[2] - c), slice(c, sr.shape[3] - c))
    y_sr = (_quantise(sr)[window] * weights).sum(1)
    y_hr = (_quantise(hr)[window] * weights).sum(1)
    mse = (y_sr - y_hr).square().mean(dim=(1, 2))
    return 10.0 * torch.log10(255.0 * 255.0 / mse)
