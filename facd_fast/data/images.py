"""Image files: listing a folder, reading RGB, writing PNG atomically, making bicubic LR images.

:func:`read_rgb` decodes a file to the 8-bit RGB a viewer shows: grey is
repeated over the three channels, palettes are looked up, CMYK is converted
(through its embedded ICC profile when there is one), 16-bit samples are
scaled to 8 bits (v * 255 / 65535, rounded; never clipped), transparency is
composited over white, and the EXIF orientation is applied. A file that does
not decode raises :class:`ImageReadError` naming it.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ..atomic_files import atomic_write
from .resize import imresize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

# EXIF orientation -> the numpy operation that shows the image upright (as PIL's ImageOps.exif_transpose).
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageReadError(ValueError):
    """An image file that cannot be decoded (truncated, empty, not an image, unsupported kind); names the file."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def list_images(folder, what: str = "image folder") -> list[Path]:
    """The image files of ``folder``, sorted by name (hidden files left out); a missing or empty folder is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _png16_colour(path: Path, image: Image.Image) -> np.ndarray | None:
    """(H, W, C) uint16 samples of a 16-bit colour PNG, or None for any other file.

    Pillow decodes such a file to the high byte of each sample only. Its PNG
    decoder unfilters by bytes per pixel, so decoding the same rows once more
    with a raw mode of the same width that keeps the other bytes recovers the
    full samples: the low bytes for RGB/RGBA ("...;16L" reads the second byte
    of each big-endian pair), all four bytes for grey+alpha (as "RGBA").
    """
    if image.format != "PNG" or len(image.tile) != 1:
        return None
    rawmode = image.tile[0].args
    rawmode = rawmode if isinstance(rawmode, str) else rawmode[0]
    second_pass = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}.get(rawmode)
    if second_pass is None:
        return None
    with Image.open(path) as again:
        again.tile = [again.tile[0]._replace(args=second_pass)]
        second = np.asarray(again).astype(np.uint16)
    if rawmode == "LA;16B":  # second holds the bytes L_hi, L_lo, A_hi, A_lo
        return np.stack([second[..., 0] << 8 | second[..., 1], second[..., 2] << 8 | second[..., 3]], axis=-1)
    return np.asarray(image).astype(np.uint16) << 8 | second


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            return ImageCms.profileToProfile(image, io.BytesIO(profile), ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImportError, OSError, ValueError, ImageCms.PyCMSError):
            pass  # no LittleCMS or a broken profile: the plain conversion below
    return image.convert("RGB")


def _samples(path: Path, image: Image.Image) -> tuple[np.ndarray, float]:
    """(H, W, 1..4) samples (grey, grey+alpha, RGB or RGBA) and their full-scale value."""
    colour16 = _png16_colour(path, image)
    if colour16 is not None:
        return colour16, 65535.0
    mode = image.mode
    if mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(image)
        if grey.min() < 0 or grey.max() > 65535:
            raise ImageReadError(path, "32-bit integer samples outside 0..65535 are not supported")
        return grey.astype(np.uint16)[..., None], 65535.0
    if mode == "F":
        raise ImageReadError(path, "floating-point images (mode F) are not supported")
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image)), 255.0
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None], 255.0
    if mode in ("LA", "La"):
        return np.asarray(image.convert("LA")), 255.0
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA")), 255.0
    return np.array(image if mode == "RGB" else image.convert("RGB")), 255.0


def _to_rgb8(samples: np.ndarray, full_scale: float) -> np.ndarray:
    """Samples (H, W, 1..4) -> (H, W, 3) uint8: grey repeated, alpha composited over white, rescaled."""
    channels = samples.shape[-1]
    colour = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=-1)
    if full_scale == 255.0 and channels in (1, 3):
        return np.ascontiguousarray(colour, dtype=np.uint8)
    values = colour.astype(np.float64) / full_scale
    if channels in (2, 4):
        alpha = samples[..., -1:].astype(np.float64) / full_scale
        values = values * alpha + (1.0 - alpha)
    return np.rint(values * 255.0).astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as a viewer shows the file (see the module docstring); ImageReadError naming it if it does not decode."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            samples, full_scale = _samples(path, image)
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except ImageReadError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for a bad file
        raise ImageReadError(path, str(error) or type(error).__name__) from error
    rgb = _to_rgb8(samples, full_scale)
    if orientation in _ORIENTATIONS:
        rgb = np.ascontiguousarray(_ORIENTATIONS[orientation](rgb))
    return rgb if rgb.flags.writeable else rgb.copy()  # writable, so torch.from_numpy accepts it


def read_rgb_or_warn(path: Path) -> np.ndarray | None:
    """``read_rgb``, or None with a warning naming the file when it cannot be decoded."""
    try:
        return read_rgb(path)
    except ImageReadError as error:
        warnings.warn(f"skipping unreadable image: {error}", stacklevel=3)
        return None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`read_rgb` returns it (EXIF rotation applied), from its header."""
    try:
        with Image.open(path) as image:
            height, width = image.height, image.width
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                height, width = width, height
    except MemoryError:
        raise
    except Exception as error:
        raise ImageReadError(path, str(error) or type(error).__name__) from error
    return height, width


def file_digest(path: Path, *tags: str) -> str:
    """sha256 (hex) of a file's bytes and ``tags``: a key that changes whenever the content does."""
    digest = hashlib.sha256("\0".join(tags).encode())
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG file; empty when the file is missing or unreadable."""
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}))
    except Exception:  # a damaged cache file counts as absent: it is rewritten
        return {}


def write_png(path: Path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write (H, W, 3) uint8 as PNG (with ``text`` chunks) atomically, so a reader never sees half a file."""
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    atomic_write(path, lambda file: Image.fromarray(image).save(file, format="PNG", pnginfo=info))


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
