"""Image files of every kind the readers must handle, written byte by byte where Pillow cannot write them."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_png16(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit PNG of ``samples`` (H, W) grey or (H, W, 2|3|4) grey+alpha / RGB / RGBA uint16, unfiltered."""
    samples = samples if samples.ndim == 3 else samples[..., None]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[samples.shape[-1]]
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def write_truncated(path: Path, whole: Path) -> Path:
    """The first half of the file ``whole``."""
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
