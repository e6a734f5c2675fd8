"""The training and validation folders of a config: "builtin" resolved to the built-in photos, checked to exist."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

from .. import data as sr_data
from .config import Config, ConfigError


def resolve_data_dirs(config: Config) -> Tuple[str, str]:
    """(train HR folder, validation folder), writing the built-in photos when a folder is "builtin"."""
    data_config = config["data"]
    train_dir, val_dir = data_config["train_hr_dir"], data_config["val_hr_dir"]
    if "builtin" in (train_dir, val_dir):
        builtin_train, builtin_val = sr_data.write_builtin_photos(data_config["builtin_root"])
        train_dir = str(builtin_train) if train_dir == "builtin" else train_dir
        val_dir = str(builtin_val) if val_dir == "builtin" else val_dir
    return train_dir, val_dir


def check_folder(name: str, path: str) -> None:
    """Raise, naming the setting ``name`` (a config key or an option), when ``path`` is unset or not a folder."""
    if not path:
        raise ConfigError(f"{name} is not set: give a folder of images or \"builtin\"")
    if Path(path).is_file():
        raise NotADirectoryError(f"{name}: {str(path)!r} is a file; give the folder that holds the images")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{name}: folder {str(path)!r} does not exist")
