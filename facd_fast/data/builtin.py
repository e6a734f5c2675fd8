"""The built-in real-photo set: colour photographs shipped inside the scikit-image and sporco wheels.

It lets the demo and the tests train and validate on real images with no
download. Sources and licences are as the packages state them (scikit-image:
the docstrings of ``skimage.data``; sporco: ``sporco/data/README.rst``); they
are listed in docs/data.md.
"""
from __future__ import annotations

import importlib.resources
import warnings
from dataclasses import dataclass
from pathlib import Path

from .images import read_rgb, write_png


@dataclass(frozen=True)
class BuiltinPhoto:
    name: str
    package: str
    file: str
    split: str  # "train" or "val"
    source: str
    licence: str


BUILTIN_PHOTOS: tuple[BuiltinPhoto, ...] = (
    BuiltinPhoto("astronaut", "skimage", "data/astronaut.png", "train",
                 "NASA Great Images database: astronaut Eileen Collins",
                 "public domain (no known copyright restrictions)"),
    BuiltinPhoto("chelsea", "skimage", "data/chelsea.png", "train",
                 "Stefan van der Walt: Chelsea the cat", "CC0"),
    BuiltinPhoto("rocket", "skimage", "data/rocket.jpg", "train",
                 "SpaceX: launch of DSCOVR on Falcon 9", "public domain (released by SpaceX)"),
    BuiltinPhoto("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", "train",
                 "NASA HubbleSite: Hubble eXtreme Deep Field", "public domain (NASA media guidelines)"),
    BuiltinPhoto("ihc", "skimage", "data/ihc.png", "train",
                 "Center for Microscopy And Molecular Imaging (CMMI): immunohistochemistry micrograph",
                 "no known copyright restrictions"),
    BuiltinPhoto("barbara", "sporco", "data/barbara.png", "train",
                 "hlevkin.com test images, attributed to Allen Gersho",
                 "believed public domain or freely redistributable (sporco README)"),
    BuiltinPhoto("sail", "sporco", "data/sail.png", "train",
                 "Waterloo BragZone", "free of copyright restrictions"),
    BuiltinPhoto("tulips", "sporco", "data/tulips.png", "train",
                 "Waterloo BragZone", "free of copyright restrictions"),
    BuiltinPhoto("coffee", "skimage", "data/coffee.png", "val",
                 "Rachel Michetti, courtesy of Pikolo Espresso Bar: coffee cup", "CC0"),
    BuiltinPhoto("kodim23", "sporco", "data/kodim23.png", "val",
                 "Kodak PhotoCD test image 23 (parrots), via r0k.us", "released for unrestricted use"),
    BuiltinPhoto("monarch", "sporco", "data/monarch.png", "val",
                 "Waterloo BragZone", "free of copyright restrictions"),
)


def _source_path(photo: BuiltinPhoto) -> Path | None:
    try:
        path = Path(str(importlib.resources.files(photo.package).joinpath(photo.file)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def read_builtin_photo(name: str):
    """(H, W, 3) uint8 RGB of the built-in photo ``name`` (see BUILTIN_PHOTOS), read from its package."""
    photo = next((p for p in BUILTIN_PHOTOS if p.name == name), None)
    if photo is None:
        raise ValueError(f"unknown built-in photo {name!r}; photos: {[p.name for p in BUILTIN_PHOTOS]}")
    source = _source_path(photo)
    if source is None:
        raise FileNotFoundError(f"built-in photo {name} needs the {photo.package} package "
                                f"(pip install 'facd-fast[train]')")
    return read_rgb(source)


def write_builtin_photos(root) -> tuple[Path, Path]:
    """Write the built-in photos as PNG into ``root/train`` and ``root/val``; returns those two folders.

    Idempotent: a PNG already there is left alone. A photo missing from the
    installed packages is skipped with a warning; none at all is an error.
    """
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    written = {"train": 0, "val": 0}
    for photo in BUILTIN_PHOTOS:
        target = (train_dir if photo.split == "train" else val_dir) / f"{photo.name}.png"
        if not target.is_file():
            source = _source_path(photo)
            if source is None:
                warnings.warn(f"built-in photo {photo.name} ({photo.package}/{photo.file}) is not installed; "
                              f"skipped", stacklevel=2)
                continue
            write_png(target, read_rgb(source))
        written[photo.split] += 1
    if not all(written.values()):
        raise FileNotFoundError(f"the built-in photos need scikit-image and sporco (pip install 'facd-fast[train]'); "
                                f"found {written['train']} train and {written['val']} validation images")
    return train_dir, val_dir
