"""``facd upscale``: image files and folders in, super-resolved PNGs out, names kept."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checks import check_int
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


def writable_folder(option: str, folder: Path) -> None:
    """PermissionError naming ``option`` when ``folder`` (or, if absent, the nearest folder above it) is not writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(f"{option} {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {str(folder)!r}: the folder {str(existing)!r} is not writable")


def plan_outputs(files: Sequence[Path], out_dir: Path, overwrite: bool = False,
                 skip_existing: bool = False) -> list[Path]:
    """``out_dir/<stem>.png`` for each input; refuses clashes, folders in the way, and existing files unless
    ``overwrite`` (replace them) or ``skip_existing`` (keep them: finishing a folder a stopped run began).

    An input is never overwritten, whatever ``overwrite`` says.
    """
    if overwrite and skip_existing:
        raise ValueError("--overwrite and --skip-existing contradict each other: replace the outputs or keep them")
    outputs = [out_dir / f"{path.stem}.png" for path in files]
    seen: dict[Path, Path] = {}
    for source, target in zip(files, outputs):
        if target in seen:
            raise ValueError(f"inputs {str(seen[target])!r} and {str(source)!r} would both be written to "
                             f"{str(target)!r}")
        seen[target] = source
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} is a file, not a folder")
    writable_folder("--out", out_dir)
    sources = {path.resolve() for path in files}
    for target in outputs:
        if target.resolve() in sources:
            raise ValueError(f"output {str(target)!r} is one of the inputs; choose another --out folder")
        if target.is_dir():
            raise IsADirectoryError(f"output {str(target)!r} is a folder; move it or choose another --out folder")
        if target.exists() and not (overwrite or skip_existing):
            raise FileExistsError(f"output {str(target)!r} exists; pass --overwrite to replace it, or "
                                  f"--skip-existing to keep it and write the others")
    return outputs


class UpscaleStopped(ValueError):
    """An input could not be read part-way: says which, and what this call had written before it."""


def _stopped_message(source: Path, error: BaseException, written: Sequence[Path]) -> str:
    shown = ", ".join(path.name for path in written[:5]) + (", ..." if len(written) > 5 else "")
    done = (f"wrote {len(written)} output(s) before it ({shown}), each whole" if written
            else "wrote nothing")
    return (f"cannot read image {str(source)!r}: {error}; {done}; fix or remove it, or pass --skip-unreadable, "
            f"then rerun with --skip-existing to finish without redoing the written ones")


@torch.no_grad()
def upscale_files(network: nn.Module, inputs: Iterable[str | Path], out_dir: str | Path, *,
                  tile: Optional[int] = None, tile_overlap: Optional[int] = None, ensemble: bool = False,
                  device: str | torch.device = "cpu", batch: int = 1, overwrite: bool = False,
                  skip_existing: bool = False, skip_unreadable: bool = False,
                  progress: bool = True) -> dict:
    """Super-resolve every image of ``inputs`` into ``out_dir`` as PNG.

    Images are decoded as ``facd eval`` decodes them (:func:`facd_fast.data.images.read_rgb`).
    Untiled, up to ``batch`` consecutive images of one size share a forward;
    tiled, up to ``batch`` tiles of one image do. Every output is checked to be
    writable before any work starts, and each is written atomically. An input that
    does not decode stops the call (:class:`UpscaleStopped`, saying what was written)
    unless ``skip_unreadable``; ``skip_existing`` keeps outputs that exist.

    Returns ``{"written": [paths], "kept": [existing outputs left as they were],
    "unreadable": [{"file", "reason"}]}``.
    """
    from tqdm.auto import tqdm

    batch = check_int("--batch", batch, 1)
    files = collect_inputs(inputs)
    out_dir = Path(out_dir)
    outputs = plan_outputs(files, out_dir, overwrite, skip_existing)
    device = resolve_device(device)
    kept = [target for target in outputs if skip_existing and target.exists()]
    todo = [(source, target) for source, target in zip(files, outputs) if target not in kept]
    network = network.to(device).eval()
    images_per_forward = 1 if tile is not None else batch
    written: list[Path] = []
    unreadable: list[dict] = []
    with tqdm(total=len(todo), desc="upscale", unit="img", disable=not progress) as bar:
        for first in range(0, len(todo), images_per_forward):
            by_shape: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = {}
            for source, target in todo[first:first + images_per_forward]:
                try:
                    pixels = images.read_rgb(source)
                except (OSError, ValueError, SyntaxError) as error:
                    if not skip_unreadable:
                        raise UpscaleStopped(_stopped_message(source, error, written)) from None
                    unreadable.append({"file": str(source), "reason": str(error)})
                    bar.update(1)
                    continue
                by_shape.setdefault(pixels.shape, []).append((target, pixels))
            for group in by_shape.values():
                lr = torch.stack([images.to_tensor(pixels) for _, pixels in group]).to(device)
                sr = super_resolve(network, lr, tile=tile, tile_overlap=tile_overlap, ensemble=ensemble, batch=batch)
                for (target, _), image in zip(group, sr.cpu()):
                    images.write_png(target, to_uint8_image(image))
                    written.append(target)
                    bar.update(1)
    return {"written": written, "kept": kept, "unreadable": unreadable}
