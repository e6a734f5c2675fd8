"""Image files: listing a folder, reading RGB, writing PNG atomically, making bicubic LR images."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .resize import imresize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def list_images(folder, what: str = "image folder") -> list[Path]:
    """The image files of ``folder``, sorted by name; a missing or empty folder is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (grey and alpha images converted); OSError/ValueError if unreadable."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # a copy: writable, so torch.from_numpy accepts it


def is_readable(path: Path) -> bool:
    """Whether ``path`` decodes as an image; warns naming the file when it does not."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError for some broken headers
        warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=3)
        return False


def read_rgb_or_warn(path: Path) -> np.ndarray | None:
    """``read_rgb``, or None with a warning naming the file when it cannot be decoded."""
    try:
        return read_rgb(path)
    except (OSError, ValueError, SyntaxError) as error:
        warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=3)
        return None


def write_png(path: Path, image: np.ndarray) -> None:
    """Write (H, W, 3) uint8 as PNG via a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(image).save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    """Cut the bottom/right rows and columns so that H and W are multiples of ``scale``."""
    height, width = image.shape[:2]
    return image[:height - height % scale, :width - width % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 HR (H, W multiples of scale) -> (H/s, W/s, 3) uint8 LR, as MATLAB's imresize of uint8."""
    x = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1)[None].to(torch.float64)
    lr = imresize(x, 1.0 / scale)[0].permute(1, 2, 0)
    return lr.round().clamp(0, 255).to(torch.uint8).numpy()


def find_lr_file(lr_dir: Path, stem: str, scale: int) -> Path | None:
    """The LR file of HR ``stem``: ``stem.*`` (DIV2K's X4 folders use ``stemx4.*``, both are tried)."""
    for candidate_stem in (f"{stem}x{scale}", stem):
        for suffix in IMAGE_SUFFIXES:
            path = lr_dir / f"{candidate_stem}{suffix}"
            if path.is_file():
                return path
    return None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) float32 in [0, 1].

    Converted in numpy: torch would spread this small copy over its thread
    pool, which on a busy machine costs more than the copy itself.
    """
    planar = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(np.divide(planar, np.float32(255), dtype=np.float32))
