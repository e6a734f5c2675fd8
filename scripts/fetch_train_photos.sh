#!/usr/bin/env bash
# Fetch and prepare the training photos for a stronger demo teacher (docs/data.md, "Fetched
# training photos"): real camera photographs that ship in Debian packages, chosen by hand
# (scripts/train_photos.py lists each one with the licence its package's copyright file states).
#
#   scripts/fetch_train_photos.sh [OUT_DIR]     # default: datasets/train-photos
#
# Downloads the packages with `apt-get download` (run `apt-get update` first), unpacks them with
# dpkg-deb, and writes OUT_DIR/<name>.png, OUT_DIR/MANIFEST.tsv (name, package, version, path,
# licence, author, sizes, sha256 of the source file, of the PNG file and of its pixels),
# OUT_DIR/NEAR_DUPLICATES.tsv (each photo's closest held-out or validation photo and its score)
# and the packages' copyright files in OUT_DIR/copyright/. Each photo is downscaled with Lanczos
# by at least 2x and to at most 1024 px on its long side (MIN_FACTOR and MAX_SIDE override):
# averaging 2x2 or more source pixels removes the JPEG blocking most of the sources carry, which a
# network would otherwise learn as real high-resolution detail.
#
# Never writes a photo that duplicates one of the held-out photos (the 12 nature photos of
# mate-backgrounds, fetched here the same way as scripts/fetch_heldout.sh does) or one of the
# built-in validation photos: identical files or pixels, or a perceptual near-duplicate (rescaled,
# re-encoded, cropped, flipped, rotated or colour-shifted copy); it exits with status 3 if it had
# to refuse one. Deterministic: the same package versions give the same files under the same
# names (the versions are printed and recorded in MANIFEST.tsv). Needs Pillow and numpy (.venv
# after `make setup`, or PYTHON=...) and, for the validation photos, scikit-image and sporco.
# Not a dependency of `make test` or `make demo`.
set -euo pipefail
out="${1:-datasets/train-photos}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
here="$(cd "$(dirname "$0")" && pwd)"
packages=(lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers lxqt-themes palapeli-data
          puzzle-jigsaw kphotoalbum tuxpaint-data scribus-template python3-scipy
          mate-backgrounds)  # the last one only for the held-out photos, which are never written
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/x"
(cd "$work/debs" && apt-get download "${packages[@]}" >/dev/null) || {
    echo "apt-get download failed (run 'apt-get update' first?)" >&2; exit 1; }
for package in "${packages[@]}"; do
    deb=("$work/debs/${package}"_*.deb)
    mkdir -p "$work/x/$package"
    dpkg-deb -x "${deb[0]}" "$work/x/$package"
    printf '%s\t%s\n' "$package" "$(dpkg-deb -f "${deb[0]}" Version)" >> "$work/versions.tsv"
done
echo "package versions:"
sed 's/^/  /' "$work/versions.tsv"
nice -n 10 "$python" "$here/train_photos.py" "$work/x" "$work/versions.tsv" "$out"
