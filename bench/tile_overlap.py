"""What the tile overlap does: tiled against whole-image output of the demo teacher on a real photo.

For each overlap, the PSNR (RGB, 8-bit) of the tiled output against the
whole-image output, the number of 8-bit values that differ and the largest
float difference. At the network's receptive radius the two agree up to
float rounding; below it, seams appear along the tile edges.

    python bench/tile_overlap.py [--tile 32] [--crop 128 192]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from facd_fast import models
from facd_fast.bench.latency import demo_teacher_checkpoint
from facd_fast.deploy import receptive_radius, super_resolve
from facd_fast.deploy.onnx_export import check_crops
from facd_fast.metrics import to_uint8_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile", type=int, default=32, help="tile side in LR pixels")
    parser.add_argument("--crop", type=int, nargs=2, default=(128, 192), metavar=("H", "W"),
                        help="LR centre crop of the built-in photo 'monarch'")
    args = parser.parse_args()
    network = models.model_from_checkpoint(demo_teacher_checkpoint()).eval()
    lr = check_crops(sizes=[tuple(args.crop)])[0]
    radius = receptive_radius(network)
    with torch.no_grad():
        whole = network(lr)
    reference = to_uint8_image(whole[0]).astype(np.int64)
    print(f"demo teacher x{network.scale}, receptive radius {radius} LR px, {args.crop[0]}x{args.crop[1]} LR crop, "
          f"tile {args.tile}, float32, {torch.get_num_threads()} threads")
    print("| overlap (LR px) | PSNR tiled vs whole (dB) | 8-bit values that differ | max abs float diff |")
    print("|---|---|---|---|")
    for overlap in sorted({0, 2, 4, 8, 12, 16, radius}):
        tiled = super_resolve(network, lr, tile=args.tile, tile_overlap=overlap)
        difference = to_uint8_image(tiled[0]).astype(np.int64) - reference
        mse = float(np.mean(difference ** 2))
        psnr = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
        print(f"| {overlap} | {psnr:.1f} | {int(np.count_nonzero(difference))} of {difference.size} | "
              f"{(tiled - whole).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
