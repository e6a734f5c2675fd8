"""Files shipped inside the package: the training configs and the demo teacher.

They are package data (``facd_fast/configs/*.toml``, ``facd_fast/checkpoints/``),
found with :mod:`importlib.resources`, so they are there wherever the package
is installed (a wheel, a source install or an editable checkout).

Two ways to name them:

- a config by its name: ``facd distill edsr_x4`` is ``facd_fast/configs/edsr_x4.toml``
  (:func:`config_path`; ``facd configs`` lists them). A path to an existing file
  always wins over a name.
- a file anywhere a config gives a path (``model.teacher_checkpoint``) by the
  ``package:`` prefix: ``package:checkpoints/edsr-demo-teacher-x2.pth`` is that
  file inside the installed package (:func:`resolve_path`). A path without the
  prefix is the user's own, relative to the current directory.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Dict

PACKAGE_PREFIX = "package:"
CONFIG_FOLDER = "configs"
CONFIG_SUFFIX = ".toml"


def package_root() -> Path:
    """The installed ``facd_fast`` folder.

    The package ships a compiled extension, so it is always installed as files
    on disk (never imported from a zip archive).
    """
    root = importlib.resources.files(__package__)
    if not isinstance(root, Path):
        raise RuntimeError(f"facd_fast must be installed as files on disk to read its data, found {root!r}")
    return root


def resolve_path(value: str | Path) -> Path:
    """A path as written in a config: ``package:REL`` is ``REL`` inside the installed package, anything else as given.

    The file need not exist; callers check and name ``value`` in their error.
    """
    text = str(value)
    if not text.startswith(PACKAGE_PREFIX):
        return Path(value)
    relative = text[len(PACKAGE_PREFIX):].lstrip("/")
    if not relative or ".." in Path(relative).parts:
        raise ValueError(f"{text!r}: a {PACKAGE_PREFIX} path names a file inside facd_fast, "
                         f"e.g. {PACKAGE_PREFIX}checkpoints/edsr-demo-teacher-x2.pth")
    return package_root() / relative


def shipped_configs() -> Dict[str, Path]:
    """The shipped configs, name -> file, sorted by name (``edsr_x4`` -> ``.../facd_fast/configs/edsr_x4.toml``)."""
    folder = package_root() / CONFIG_FOLDER
    return {path.stem: path for path in sorted(folder.glob(f"*{CONFIG_SUFFIX}"), key=lambda path: path.stem)}


def config_path(name_or_path: str | Path) -> Path:
    """The config file a user means: an existing file as given, else the shipped config of that name.

    ``"edsr_x4"`` and ``"edsr_x4.toml"`` name the shipped one unless a file of
    that name exists in the current directory. Anything else is a
    :class:`FileNotFoundError` naming the argument and the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[: -len(CONFIG_SUFFIX)] if path.name.endswith(CONFIG_SUFFIX) else path.name
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    if path.exists():
        raise FileNotFoundError(f"config file {str(name_or_path)!r} is not a file")
    raise FileNotFoundError(f"config file {str(name_or_path)!r} does not exist, and it is not the name of a "
                            f"shipped config ({', '.join(shipped)}; `facd configs` lists them)")


def config_summary(path: str | Path) -> str:
    """A config's one-line description: the first line of its leading comment ('' if it has none)."""
    first = Path(path).read_text().split("\n", 1)[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""
