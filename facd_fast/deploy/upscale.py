"""``facd upscale``: image files and folders in, super-resolved PNGs out, names kept."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data import images
from ..metrics import to_uint8_image
from .inference import super_resolve


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that this machine has; ValueError naming it otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device: {device!r} is not a device ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} but this torch has no CUDA device")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {device!r}; upscale runs on cpu or cuda")
    return resolved


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders whose images are taken in name order)."""
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files += images.list_images(entry, what="input folder")
        elif entry.is_file():
            if entry.suffix.lower() not in images.IMAGE_SUFFIXES:
                raise ValueError(f"input {str(entry)!r} is not an image file ({', '.join(images.IMAGE_SUFFIXES)})")
            files.append(entry)
        else:
            raise FileNotFoundError(f"input {str(entry)!r} does not exist")
    if not files:
        raise ValueError("no input images given")
    return files


def plan_outputs(files: Sequence[Path], out_dir: Path, overwrite: bool = False) -> list[Path]:
    """``out_dir/<stem>.png`` for each input; refuses clashes, and existing files unless ``overwrite``.

    An input is never overwritten, whatever ``overwrite`` says.
    """
    outputs = [out_dir / f"{path.stem}.png" for path in files]
    seen: dict[Path, Path] = {}
    for source, target in zip(files, outputs):
        if target in seen:
            raise ValueError(f"inputs {str(seen[target])!r} and {str(source)!r} would both be written to "
                             f"{str(target)!r}")
        seen[target] = source
    sources = {path.resolve() for path in files}
    for target in outputs:
        if target.resolve() in sources:
            raise ValueError(f"output {str(target)!r} is one of the inputs; choose another --out folder")
        if target.exists() and not overwrite:
            raise FileExistsError(f"output {str(target)!r} exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    return outputs


@torch.no_grad()
def upscale_files(network: nn.Module, inputs: Iterable[str | Path], out_dir: str | Path, *,
                  tile: Optional[int] = None, tile_overlap: Optional[int] = None, ensemble: bool = False,
                  device: str | torch.device = "cpu", batch: int = 1, overwrite: bool = False,
                  progress: bool = True) -> list[Path]:
    """Super-resolve every image of ``inputs`` into ``out_dir`` as PNG; returns the written paths.

    Images are decoded as ``facd eval`` decodes them (:func:`facd_fast.data.images.read_rgb`).
    Untiled, up to ``batch`` consecutive images of one size share a forward;
    tiled, up to ``batch`` tiles of one image do. Every output is checked to be
    writable before any work starts, and each is written atomically.
    """
    from tqdm.auto import tqdm

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be an int >= 1, got {batch!r}")
    files = collect_inputs(inputs)
    out_dir = Path(out_dir)
    outputs = plan_outputs(files, out_dir, overwrite)
    device = resolve_device(device)
    network = network.to(device).eval()
    images_per_forward = 1 if tile is not None else batch
    written = []
    with tqdm(total=len(files), desc="upscale", unit="img", disable=not progress) as bar:
        for first in range(0, len(files), images_per_forward):
            chunk = list(zip(files[first:first + images_per_forward], outputs[first:first + images_per_forward]))
            by_shape: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = {}
            for source, target in chunk:
                try:
                    pixels = images.read_rgb(source)
                except (OSError, ValueError, SyntaxError) as error:
                    raise ValueError(f"cannot read image {str(source)!r}: {error}") from None
                by_shape.setdefault(pixels.shape, []).append((target, pixels))
            for group in by_shape.values():
                lr = torch.stack([images.to_tensor(pixels) for _, pixels in group]).to(device)
                sr = super_resolve(network, lr, tile=tile, tile_overlap=tile_overlap, ensemble=ensemble, batch=batch)
                for (target, _), image in zip(group, sr.cpu()):
                    images.write_png(target, to_uint8_image(image))
                    written.append(target)
                    bar.update(1)
    return written

