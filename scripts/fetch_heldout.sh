#!/usr/bin/env bash
# Fetch and prepare the held-out photos of the study (docs/results.md): the 12 nature
# photos of Debian's `mate-backgrounds` package (GPL-2+/CC-BY-SA; see the package's
# copyright file), never part of training, validation or the choice of any setting.
#
#   scripts/fetch_heldout.sh [OUT_DIR]     # default: datasets/heldout-mate
#
# Each photo (1280-2560 px JPEG) is downscaled with PIL's Lanczos filter to 512 px on
# its long side (so a CPU evaluates the 12 in seconds; the downscale also removes most
# JPEG blocking) and written as OUT_DIR/<name>.png. Needs apt-get (Debian/Ubuntu) and
# network access to a Debian mirror; not a dependency of `make test` or `make demo`.
set -euo pipefail
out="${1:-datasets/heldout-mate}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download mate-backgrounds >/dev/null)
dpkg-deb -x "$work"/mate-backgrounds_*.deb "$work/x"
mkdir -p "$out"
"$python" - "$work/x/usr/share/backgrounds/mate/nature" "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image

source, out = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(source.glob("*.jpg"))
if len(files) != 12:
    sys.exit(f"expected 12 photos in {source}, found {len(files)}")
for path in files:
    with Image.open(path) as image:
        image = image.convert("RGB")
        factor = 512 / max(image.size)
        size = (round(image.width * factor), round(image.height * factor))
        image.resize(size, Image.LANCZOS).save(out / f"{path.stem}.png")
    print(f"{out / (path.stem + '.png')}  {size[0]}x{size[1]}")
PY
