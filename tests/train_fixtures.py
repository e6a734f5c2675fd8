"""Tiny images, configs and a teacher checkpoint for the trainer and CLI tests (a few seconds per run)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facd_fast import models

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` smooth random RGB PNGs of size x size (low-frequency content, so SR is learnable)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        pixels = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
    return folder


def write_teacher(path: Path, scale: int = 2) -> Path:
    """A randomly initialised demo teacher in our BasicSR format (its quality does not matter to the tests)."""
    torch.manual_seed(1)
    models.save_checkpoint_basicsr(models.build("edsr-demo-teacher", scale), path)
    return path


def tiny_config(tmp_path: Path, **sections) -> Path:
    """A TOML config training the demo student at x2 on tiny patches, with ``sections`` merged in as overrides."""
    data = tmp_path / "data"
    train_dir = write_images(data / "train", 4, 48, seed=0) if not (data / "train").exists() else data / "train"
    val_dir = write_images(data / "val", 2, 40, seed=1) if not (data / "val").exists() else data / "val"
    teacher = tmp_path / "teacher.pth"
    if not teacher.exists():
        write_teacher(teacher)
    values = {
        "run": {"out_dir": str(tmp_path / "run"), "seed": 3, "deterministic": True, "threads": 1},
        "model": {"student": "edsr-demo-student", "teacher": "edsr-demo-teacher",
                  "teacher_checkpoint": str(teacher), "scale": 2},
        "data": {"train_hr_dir": str(train_dir), "val_hr_dir": str(val_dir), "patch_size": 16, "repeat": 4,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "iterations": 6, "lr": 2e-4, "log_every": 1, "val_every": 3,
                  "checkpoint_every": 3, "progress": False, "plots": False, "channels_last": False},
        "distill": {"method": "facd"},
    }
    for section, updates in sections.items():
        values[section].update(updates)
    lines = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        for key, value in entries.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = f'"{value}"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def facd_command(*args: str) -> list:
    return [sys.executable, "-m", "facd_fast", *args]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FACD_BACKEND", None)
    return env


def run_facd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(facd_command(*args), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
