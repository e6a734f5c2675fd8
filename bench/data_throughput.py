"""Training-data throughput on the built-in photo set: batches per second of PairedFolderDataset + DataLoader.

    python bench/data_throughput.py [--scale 4] [--patch 96 192] [--batch 16] [--workers 0 2] [--batches 200]

Prints one line per (patch, workers) setting and, with --csv, appends rows
(scale, patch, batch, workers, batches_per_s, patches_per_s, cpu_count, torch).
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from facd_fast.data import PairedFolderDataset, write_builtin_photos


def measure(train_dir: Path, scale: int, patch: int, batch: int, workers: int, batches: int) -> float:
    """Batches per second after one warm-up batch (worker start-up excluded)."""
    dataset = PairedFolderDataset(train_dir, scale, patch, repeat=max(1, (batches + 1) * batch))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="where to write the photos (default: a temp dir)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs="+", default=[96, 192])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        train_dir, _ = write_builtin_photos(args.root or scratch)
        rows = []
        for patch in args.patch:
            for workers in args.workers:
                rate = measure(train_dir, args.scale, patch, args.batch, workers, args.batches)
                rows.append({"scale": args.scale, "patch": patch, "batch": args.batch, "workers": workers,
                             "batches_per_s": round(rate, 1), "patches_per_s": round(rate * args.batch),
                             "cpu_count": os.cpu_count(), "torch": torch.__version__})
                print(f"x{args.scale} patch {patch:4d} batch {args.batch} workers {workers}: "
                      f"{rate:8.1f} batches/s ({rate * args.batch:9.0f} patches/s)")
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
