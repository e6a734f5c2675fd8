"""Training patches from an HR folder and benchmark images from the usual SR folder layouts."""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..checks import check_int
from ..metrics import min_eval_size
from .images import (ImageReadError, bicubic_lr, crop_to_multiple, file_digest, find_lr_file, image_size,
                     list_images, png_text, read_rgb, read_rgb_or_warn, to_tensor, write_png)

# Decoded size below which training images are held in memory: patches are
# then cut from arrays instead of decoding a whole PNG per patch.
IN_MEMORY_LIMIT_BYTES = 2 << 30
# A cached LR file records the key of what it was made from in a PNG text chunk: the
# sha256 of the HR file's bytes, the scale and this version (bumped whenever the HR
# decoding or the bicubic change what an LR file holds).
LR_CACHE_VERSION = "facd-lr-bicubic-2"
LR_CACHE_KEY = "facd_lr_source"


def _check_lr_shape(lr: np.ndarray, hr: np.ndarray, scale: int, lr_path: Path) -> None:
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    if lr.shape[:2] != expected:
        raise ValueError(f"LR image {lr_path} is {lr.shape[1]}x{lr.shape[0]} (WxH), expected "
                         f"{expected[1]}x{expected[0]} for its HR image at scale {scale}")


class PairedFolderDataset(Dataset):
    """Random aligned (LR, HR) training patches from a folder of HR images.

    Each item is ``(lr, hr)``: float32 (3, p/s, p/s) and (3, p, p) in [0, 1],
    with p = ``patch_size``, cut at a random position of image ``i % n`` for
    index ``i``, then flipped and rotated by 90 degrees at random when
    ``augment``. HR images are cropped to a multiple of ``scale``.
    LR images come from ``lr_dir`` (DIV2K's ``X4`` layout: ``0001x4.png`` or
    ``0001.png``) or, without it, are made once with MATLAB-compatible bicubic
    and cached as PNG in ``cache_dir`` (default ``<hr_dir>_LR_bicubic/X<s>``
    beside ``hr_dir``); a cached file is used only when it records the
    sha256 of its HR file's current content, else it is made again. ``repeat`` multiplies the length (patches per epoch).
    ``in_memory`` (default: when the decoded images fit in 2 GiB) keeps the
    decoded images in RAM. Unreadable images are skipped with a warning.
    """

    def __init__(self, hr_dir, scale: int, patch_size: int, *, lr_dir=None, cache_dir=None, augment: bool = True,
                 repeat: int = 1, in_memory: bool | None = None):
        self.scale = check_int("scale", scale, 1)
        self.patch_size = check_int("patch_size", patch_size, 1)
        if self.patch_size % self.scale:
            raise ValueError(f"patch_size must be a multiple of scale, got patch_size={patch_size}, scale={scale}")
        self.repeat = check_int("repeat", repeat, 1)
        self.augment = bool(augment)
        self.hr_dir = Path(hr_dir)
        hr_files = list_images(self.hr_dir, "HR folder")
        if lr_dir is not None:
            self.lr_dir, self.cache_dir = Path(lr_dir), None
            list_images(self.lr_dir, "LR folder")
        else:
            self.lr_dir = None
            self.cache_dir = (Path(cache_dir) if cache_dir is not None
                              else self.hr_dir.with_name(f"{self.hr_dir.name}_LR_bicubic") / f"X{self.scale}")
        if in_memory is None:
            in_memory = self._decoded_bytes(hr_files) <= IN_MEMORY_LIMIT_BYTES
        self.in_memory = bool(in_memory)
        self.pairs: list[tuple[Path, Path]] = []
        self.images: list[tuple[np.ndarray, np.ndarray]] = []
        for hr_path in hr_files:
            self._add(hr_path)
        if not self.pairs:
            raise ValueError(f"HR folder {self.hr_dir} holds no usable image of at least {patch_size}x{patch_size}")

    @staticmethod
    def _decoded_bytes(files: list[Path]) -> int:
        total = 0
        for path in files:
            try:
                with Image.open(path) as image:
                    total += 3 * image.width * image.height * (1 + 1 / 4)  # HR plus an LR at x2 or less
            except (OSError, ValueError, SyntaxError):
                continue  # reported when the file is added
        return int(total)

    def _cached_lr(self, hr_path: Path) -> tuple[Path | None, str | None]:
        """(the LR file of an HR image if it exists and was made from its current content, the cache key)."""
        if self.lr_dir is not None:
            lr_path = find_lr_file(self.lr_dir, hr_path.stem, self.scale)
            if lr_path is None:
                raise FileNotFoundError(f"no LR image for {hr_path.name} in {self.lr_dir} "
                                        f"(looked for {hr_path.stem}x{self.scale}.* and {hr_path.stem}.*)")
            return lr_path, None
        key = file_digest(hr_path, LR_CACHE_VERSION, f"x{self.scale}")
        lr_path = self.cache_dir / f"{hr_path.stem}.png"
        return (lr_path if png_text(lr_path).get(LR_CACHE_KEY) == key else None), key

    def _add(self, hr_path: Path) -> None:
        lr_path, key = self._cached_lr(hr_path)
        lr = hr = None
        if self.in_memory or lr_path is None:
            hr = read_rgb_or_warn(hr_path)
            if hr is None:
                return
            hr = crop_to_multiple(hr, self.scale)
            size = hr.shape[:2]
        else:
            try:
                height, width = image_size(hr_path)
            except ImageReadError as error:
                warnings.warn(f"skipping unreadable image: {error}", stacklevel=3)
                return
            size = (height - height % self.scale, width - width % self.scale)
        if min(size) < self.patch_size:
            warnings.warn(f"skipping {hr_path}: {size[1]}x{size[0]} is smaller than the "
                          f"{self.patch_size}x{self.patch_size} patch", stacklevel=3)
            return
        if lr_path is None:
            lr_path = self.cache_dir / f"{hr_path.stem}.png"
            lr = bicubic_lr(hr, self.scale)
            write_png(lr_path, lr, text={LR_CACHE_KEY: key})
        if self.in_memory:
            lr = read_rgb_or_warn(lr_path) if lr is None else lr
            if lr is None:
                return
            _check_lr_shape(lr, hr, self.scale, lr_path)
            self.images.append((lr, hr))
        self.pairs.append((hr_path, lr_path))

    def __len__(self) -> int:
        return len(self.pairs) * self.repeat

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.in_memory:
            return self.images[index]
        hr_path, lr_path = self.pairs[index]
        hr, lr = crop_to_multiple(read_rgb(hr_path), self.scale), read_rgb(lr_path)
        _check_lr_shape(lr, hr, self.scale, lr_path)
        return lr, hr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index)

    def sample(self, index: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index``, its crop and flips drawn from ``generator`` (default: torch's global generator)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        lr, hr = self._load(index % len(self.pairs))
        lr_patch = self.patch_size // self.scale
        # torch's generator, not numpy's: DataLoader seeds it differently in every worker.
        top = int(torch.randint(lr.shape[0] - lr_patch + 1, (), generator=generator))
        left = int(torch.randint(lr.shape[1] - lr_patch + 1, (), generator=generator))
        lr = lr[top:top + lr_patch, left:left + lr_patch]
        hr = hr[top * self.scale:(top + lr_patch) * self.scale, left * self.scale:(left + lr_patch) * self.scale]
        if self.augment:
            hflip, vflip, transpose = (torch.rand(3, generator=generator) < 0.5).tolist()
            lr, hr = (_flip_rotate(image, hflip, vflip, transpose) for image in (lr, hr))
        return to_tensor(lr), to_tensor(hr)


class SeededPatches(Dataset):
    """A :class:`PairedFolderDataset` whose random crops and flips depend only on the item's place in the run.

    Items are keyed ``(epoch, rank, position, index)``: patch ``index`` of
    ``dataset`` with its crop and flips drawn from a generator seeded by
    ``(seed, epoch, rank, position)``, never from the global RNG. Two runs with
    the same seed and sampler therefore see the same patches in the same order
    whatever else they draw (the DR adapters of one method, a loss that samples),
    and a resumed run, with or without workers, sees what an uninterrupted one would.
    """

    def __init__(self, dataset: PairedFolderDataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, rank, position, index = key
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{rank}:{position}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return self.dataset.sample(index, generator)


def _flip_rotate(image: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """The 8 symmetries of the square: flips and a transpose (with the flips, the 90-degree rotations)."""
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1]
    if transpose:
        image = image.transpose(1, 0, 2)
    return image


class BenchmarkFolder(Sequence):
    """A benchmark set: items ``(name, lr, hr)``, float32 (3, h, w) and (3, h*s, w*s) in [0, 1].

    ``root_or_hr_dir`` is a set folder with ``HR/`` (and ``LR_bicubic/X<s>/``,
    the layout of the EDSR benchmark package: ``Set5/LR_bicubic/X4/babyx4.png``)
    or a plain folder of HR images. HR is cropped to a multiple of ``scale``;
    without LR files the LR is made with MATLAB-compatible bicubic and
    quantised to uint8, as the published LR files were.

    Every image is decoded once here, so that a bad folder fails before any
    work: an unreadable HR or LR file raises :class:`ImageReadError` naming it,
    unless ``skip_unreadable``, which leaves it out and lists it in
    ``skipped`` (``[{"file", "reason"}]``); an image too small to score at
    this scale (:func:`facd_fast.metrics.min_eval_size`) or an LR file of the
    wrong size raises ValueError naming it.
    """

    def __init__(self, root_or_hr_dir, scale: int, *, lr_dir=None, skip_unreadable: bool = False):
        self.scale = check_int("scale", scale, 1)
        root = Path(root_or_hr_dir)
        if (root / "HR").is_dir():
            self.hr_dir = root / "HR"
            default_lr = root / "LR_bicubic" / f"X{self.scale}"
            self.lr_dir = Path(lr_dir) if lr_dir is not None else (default_lr if default_lr.is_dir() else None)
        else:
            self.hr_dir = root
            self.lr_dir = Path(lr_dir) if lr_dir is not None else None
        if self.lr_dir is not None:
            list_images(self.lr_dir, "LR folder")
        self.hr_files: list[Path] = []
        self.skipped: list[dict[str, str]] = []
        for hr_path in list_images(self.hr_dir, "HR folder"):
            try:
                self._load(hr_path, make_lr=False)
            except ImageReadError as error:
                if not skip_unreadable:
                    raise
                self.skipped.append({"file": str(error.path), "reason": error.reason})
                continue
            self.hr_files.append(hr_path)
        if not self.hr_files:
            raise ValueError(f"HR folder {self.hr_dir} holds no readable image")

    def _load(self, hr_path: Path, make_lr: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """(lr, hr) uint8 arrays of one HR file, checked (lr None when it would be made and ``make_lr`` is off)."""
        hr = crop_to_multiple(read_rgb(hr_path), self.scale)
        least = min_eval_size(self.scale)
        if min(hr.shape[:2]) < least:
            raise ValueError(f"image {hr_path} is {hr.shape[1]}x{hr.shape[0]} (WxH) after cropping to a multiple "
                             f"of {self.scale}, smaller than the {least}x{least} that scoring at x{self.scale} needs "
                             f"(an 11x11 SSIM window inside a {self.scale}-pixel border)")
        if self.lr_dir is None:
            return (bicubic_lr(hr, self.scale) if make_lr else None), hr
        lr_path = find_lr_file(self.lr_dir, hr_path.stem, self.scale)
        if lr_path is None:
            raise FileNotFoundError(f"no LR image for {hr_path.name} in {self.lr_dir}")
        lr = read_rgb(lr_path)
        _check_lr_shape(lr, hr, self.scale, lr_path)
        return lr, hr

    @property
    def names(self) -> list[str]:
        return [path.stem for path in self.hr_files]

    def __len__(self) -> int:
        return len(self.hr_files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        hr_path = self.hr_files[index]
        lr, hr = self._load(hr_path)
        return hr_path.stem, to_tensor(lr), to_tensor(hr)
