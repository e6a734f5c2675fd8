"""Build the fetched training photo set from unpacked Debian packages (called by scripts/fetch_train_photos.sh).

    python scripts/train_photos.py UNPACKED_DIR VERSIONS_TSV OUT_DIR

UNPACKED_DIR/<package>/ holds each package's files as `dpkg-deb -x` writes them;
VERSIONS_TSV has one `package<TAB>version` line per package. Needs Pillow and numpy.

Every photo in PHOTOS is decoded, checked against the excluded photos (the
held-out photos of mate-backgrounds and the built-in validation photos), checked
against the photos already kept (near-duplicates within the set), downscaled
and written as OUT_DIR/<name>.png, and listed in OUT_DIR/MANIFEST.tsv. The
licence and author columns are what each package's copyright file says (see
docs/data.md); nothing here is a legal judgement of its own.
"""
from __future__ import annotations

import ast
import bz2
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageEnhance, ImageOps

# Downscale: every photo by at least MIN_FACTOR, and to at most MAX_SIDE pixels on its long side,
# with Lanczos. Most sources are JPEG files whose 8x8 blocking and chroma subsampling would
# otherwise be learnt as "high resolution" detail; averaging >= 2x2 source pixels per output pixel
# removes nearly all of it (fetch_heldout.sh prepares the held-out photos the same way, by 2.5-5x).
MAX_SIDE = int(os.environ.get("MAX_SIDE", "1024"))
MIN_FACTOR = float(os.environ.get("MIN_FACTOR", "2"))
MIN_SOURCE_SIDE = 800  # selection rule: a photo's long side is at least this many source pixels

# Near-duplicate thresholds on the crop-search correlation below (1 = the same picture).
# Measured (docs/data.md): copies of the held-out photos that were rescaled, re-encoded,
# flipped, colour-shifted or cropped to 60-100 % per side score >= 0.62; unrelated photos
# score <= 0.45 against the held-out set and <= 0.60 among themselves (two different moons).
EXCLUDE_AT = 0.55  # against the held-out and validation photos: err towards leaving a photo out
DEDUP_AT = 0.80    # within the set: only clear copies are dropped

MATE_NATURE = "usr/share/backgrounds/mate/nature"  # the held-out photos (scripts/fetch_heldout.sh)


@dataclass(frozen=True)
class Photo:
    name: str
    package: str
    path: str      # inside the package
    licence: str   # as the package's copyright file states it
    author: str    # as the package states it ("" where it names none)


def _lomiri(file, licence, author, package="lomiri-wallpapers-16.04"):
    stem = file.rsplit(".", 1)[0].split("_by_")[0].lower().replace("-", "_")
    return Photo(f"lomiri-{stem}", package, f"usr/share/backgrounds/{file}", licence, author)


def _plasma(folder, author):
    return Photo(f"plasma-{folder.lower()}", "plasma-workspace-wallpapers",
                 f"usr/share/wallpapers/{folder}/contents/images/2560x1600.jpg",
                 "GPL-2+ (copyright file, Files: *); the wallpaper's metadata.json says LGPLv3", author)


_LXQT_LICENCE = "LGPL-2.1+ (copyright file, Files: *); the folder's License file says CC-BY-SA-3.0"


def _lxqt(file, author):
    stem = file.rsplit(".", 1)[0].lower().replace("-", "_")
    return Photo(f"lxqt-{stem}", "lxqt-themes", f"usr/share/lxqt/wallpapers/{file}", _LXQT_LICENCE, author)


def _palapeli(stem, licence, author):
    return Photo(f"palapeli-{stem.replace('-', '_')}", "palapeli-data", f"usr/share/palapeli/collection/{stem}.jpg",
                 f"GPL-2+ (copyright file, Files: *); the puzzle's .desktop file says {licence}", author)


_KPA = ("bar55", "bar55_2", "blackie", "cold_water", "donna", "donna_2", "grand_canyon_1", "grand_canyon_2",
        "grand_canyon_3", "jesper", "jesper_2", "new_wave_1", "new_wave_2", "pool", "pool_2", "qt-logo", "skagen",
        "skagen_2", "snow", "spiff", "spiff_2", "sunset", "wayne")
_TUXPAINT = ("burnt_bark", "cliff", "corn_maze", "jellyfish", "lighthouse", "mossy_log", "mudstone", "ocean_splash",
             "ocean_waves", "redwoods_above", "rocks", "sheep", "spiders_web", "sun_behind_clouds", "sun_behind_leaves")
_SCRIBUS = ("br2/brightness", "br2/halfmoon", "br2/moon", "br2/nature", "br2/sunset", "cal2/moon", "menu2/pizza")

# The selection (docs/data.md gives the rule and what was left out). Order matters only for the
# within-set duplicate check: of two near-duplicates the later one is dropped.
PHOTOS: tuple[Photo, ...] = (
    _lomiri("Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0", "Sander Klootwijk"),
    _lomiri("Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0", "\"Bolly\""),
    _lomiri("Picture_0B_by_freespace.jpg", "CC-BY-4.0", "Trevor \"Freespace\""),
    _lomiri("Picture_1A_by_freespace.jpg", "CC-BY-4.0", "Trevor \"Freespace\""),
    _lomiri("Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0", "Jakub Mede"),
    _lomiri("aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich"),
    _lomiri("friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("greentock_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich"),
    _lomiri("life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("seeding_by_Clements_Engelhardt.jpg", "CC0-1.0", "Clemens Engelhardt"),
    _lomiri("sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0", "Lukas Baubkus", package="lomiri-wallpapers-20.04"),
    _plasma("BytheWater", "Maciej Wiklo"),
    _plasma("ColdRipple", "Risto Saukonpää"),
    _plasma("ColorfulCups", "Dmitri Popov"),
    _plasma("DarkestHour", "Risto Saukonpää"),
    _plasma("EveningGlow", "Ian Hex"),
    _plasma("FallenLeaf", "Martin Klapetek"),
    _plasma("Kite", "Risto Saukonpää"),
    _plasma("OneStandsOut", "Risto Saukonpää"),
    _plasma("Path", "Risto Saukonpää"),
    _plasma("summer_1am", "Risto Saukonpää"),
    _lxqt("Butterfly-Kenneth-Wimer.jpg", ""),
    _lxqt("Valendas.png", ""),
    _lxqt("after-the-rain.jpg", "stefonarch"),
    _lxqt("appleflower.png", "stefonarch"),
    _lxqt("beam.png", "stefonarch"),
    _lxqt("butterfly.png", "stefonarch"),
    _lxqt("cloud.png", ""),
    _lxqt("drop.png", "stefonarch"),
    _lxqt("flowers.png", "stefonarch"),
    _lxqt("fog.jpg", "stefonarch"),
    _lxqt("this-is-not-windows.jpg", "stefonarch"),
    _palapeli("castle-maintenon", "FDL", "Eric Pouhier"),
    _palapeli("cincinnati-bridge", "Public Domain", "Derek Jensen"),
    _palapeli("citrus-fruits", "Public Domain", "US Department of Agriculture"),
    _palapeli("european-honey-bee", "Public Domain", "John Severns"),
    _palapeli("panther-chameleon-female", "GNU-FDL", "B. Navez and others"),
    Photo("jigsaw-cat", "puzzle-jigsaw", "usr/share/puzzle-jigsaw/samples/cat-animal-cat-portrait-mackerel.jpg",
          "CC0-1.0", "Pexels"),
    Photo("jigsaw-tiger", "puzzle-jigsaw", "usr/share/puzzle-jigsaw/samples/pexels-photo-302304.jpeg",
          "CC0-1.0", "Pexels"),
    *(Photo(f"kphotoalbum-{stem.replace('-', '_')}", "kphotoalbum", f"usr/share/kphotoalbum/demo/{stem}.jpg",
            "GPL-2+ (copyright file, whole package)", "") for stem in _KPA),
    *(Photo(f"tuxpaint-{stem}", "tuxpaint-data", f"usr/share/tuxpaint/templates/{stem}.jpg",
            "GPL-2+ (copyright file, Files: *)", "Bill Kendrick (AUTHORS.txt)") for stem in _TUXPAINT),
    *(Photo(f"scribus-{stem.replace('/', '_')}", "scribus-template", f"usr/share/scribus/templates/{stem}.jpg",
            "public domain (copyright file: templates placed into the public domain by their author)",
            "Riku Leino") for stem in _SCRIBUS),
    Photo("scipy-face", "python3-scipy", "usr/lib/python3/dist-packages/scipy/misc/face.dat",
          "BSD-3-clause (copyright file, Files: *; no stanza of its own)", ""),
)


# ---------------------------------------------------------------------------------------------- decoding

def decode(path: Path) -> Image.Image:
    """The 8-bit RGB picture a viewer shows (as facd_fast.data.images.read_rgb: EXIF orientation applied,
    transparency composited over white)."""
    if path.name == "face.dat":  # scipy.misc.face: bz2-compressed raw 768 x 1024 x 3 uint8
        raw = bz2.decompress(path.read_bytes())
        return Image.fromarray(np.frombuffer(raw, dtype=np.uint8).reshape(768, 1024, 3))
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I", "F"):
            raise ValueError(f"{path}: {image.mode} images are not expected here")
        if image.mode in ("L", "1"):
            raise ValueError(f"{path}: a grey image; only colour photos are selected")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            background.alpha_composite(rgba)
            return background.convert("RGB")
        return image.convert("RGB")


def pixels_sha256(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()


# ------------------------------------------------------------------------------ near-duplicate check
#
# Each picture becomes a grey high-pass map (a 5x5 box blur subtracted, so that smooth skies and
# vignettes do not count, only structure). "Is A a crop of B?" slides A, resized to 60-100 % of B's
# width (its height following A's aspect ratio), over every position of B's 48-pixel map, under the
# four flips (none, left-right, top-bottom, both, i.e. also 180-degree rotations); the best
# position is then refined on 160-pixel maps (scale +-3 %, position +-5 px). The score is the
# normalised cross-correlation there. score(A, B) tries both directions, and A's transposes
# (90-degree rotations) too.

def _high_pass(a: np.ndarray, k: int = 5) -> np.ndarray:
    h, w = a.shape
    padded = np.pad(a, k // 2, mode="edge")
    blurred = np.zeros_like(a)
    for dy in range(k):
        for dx in range(k):
            blurred += padded[dy:dy + h, dx:dx + w]
    return a - blurred / (k * k)


class Signature:
    COARSE, FINE = 48, 160

    def __init__(self, image: Image.Image, transpose: bool = False):
        grey = image.convert("L")
        factor = max(grey.size) / 320
        if factor > 1:
            grey = grey.resize((max(1, round(grey.width / factor)), max(1, round(grey.height / factor))), Image.BOX)
        if transpose:
            grey = grey.transpose(Image.TRANSPOSE)
        self.grey = grey
        self.maps = {}
        for side in (self.COARSE, self.FINE):
            factor = side / max(grey.size)
            w, h = max(8, round(grey.width * factor)), max(8, round(grey.height * factor))
            self.maps[side] = (w, h, _high_pass(np.asarray(grey.resize((w, h), Image.BOX), dtype=np.float64)))
        self._transposed = None

    def transposed(self) -> "Signature":
        if self._transposed is None:
            self._transposed = Signature(self.grey, transpose=True)
        return self._transposed

    def templates(self, w: int, h: int) -> np.ndarray:
        """(4, h, w): this picture at w x h, high-passed, zero-mean, unit norm, under the four flips."""
        t = _high_pass(np.asarray(self.grey.resize((w, h), Image.BOX), dtype=np.float64))
        t -= t.mean()
        norm = np.linalg.norm(t)
        t = t / norm if norm > 1e-9 else t
        return np.stack([t, t[:, ::-1], t[::-1], t[::-1, ::-1]])


def _ncc(windows: np.ndarray, templates: np.ndarray) -> np.ndarray:
    centred = windows - windows.mean(axis=(-2, -1), keepdims=True)
    norms = np.sqrt(np.maximum((centred ** 2).sum(axis=(-2, -1)), 1e-12))
    # templates are zero-mean, so the window mean drops out of the product
    return np.einsum("...ij,fij->f...", windows, templates) / norms


def crop_score(a: Signature, b: Signature, refine_above: float = 0.45) -> float:
    """How well picture a matches some window of picture b (1 = a is a rescaled crop of b)."""
    aspect = a.grey.height / a.grey.width
    w, h, coarse = b.maps[Signature.COARSE]
    best, where = -1.0, None
    for fx in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6):
        tw = round(fx * w)
        th = round(tw * aspect)
        if th > h or th < 0.55 * h or tw < 6 or th < 6:
            continue
        scores = _ncc(sliding_window_view(coarse, (th, tw)), a.templates(tw, th))  # (4, P, Q)
        f, i, j = np.unravel_index(np.argmax(scores), scores.shape)
        if scores[f, i, j] > best:
            best, where = float(scores[f, i, j]), (fx, f, j / w, i / h)
    if best < refine_above:
        return best
    fx, f, x0, y0 = where
    w, h, fine = b.maps[Signature.FINE]
    refined = -1.0
    for step in range(-3, 4):
        tw = round((fx + step / 100) * w)
        th = round(tw * aspect)
        if tw > w or th > h or tw < 6 or th < 6:
            continue
        template = a.templates(tw, th)[f:f + 1]
        cx, cy = round(x0 * w), round(y0 * h)
        ys = range(max(0, cy - 5), min(h - th, cy + 5) + 1)
        xs = range(max(0, cx - 5), min(w - tw, cx + 5) + 1)
        if not ys or not xs:
            continue
        windows = sliding_window_view(fine[ys[0]:ys[-1] + th, xs[0]:xs[-1] + tw], (th, tw))
        refined = max(refined, float(_ncc(windows, template).max()))
    return refined


def score(a: Signature, b: Signature) -> float:
    """Near-duplicate score of two pictures under rescaling, cropping, flips and 90-degree rotations."""
    at = a.transposed()
    return max(crop_score(a, b), crop_score(b, a), crop_score(at, b), crop_score(b, at))


def self_test(excluded: dict[str, Signature], sources: dict[str, Image.Image]) -> float:
    """Lowest score of derived copies of the held-out photos against their originals; must clear EXCLUDE_AT."""
    lowest = 1.0
    for name, image in sources.items():
        w, h = image.size
        derived = [
            image.crop((int(0.2 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h))).transpose(Image.FLIP_LEFT_RIGHT),
            ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.2)).enhance(0.6).transpose(Image.ROTATE_90),
            image.crop((0, int(0.06 * h), w, int(0.94 * h))),
        ]
        for copy in derived:
            copy = copy.resize((600, round(600 * copy.height / copy.width)), Image.LANCZOS)
            buffer = io.BytesIO()
            copy.save(buffer, "JPEG", quality=70)
            with Image.open(buffer) as reread:
                lowest = min(lowest, score(Signature(reread.convert("RGB")), excluded[name]))
    return lowest


# ------------------------------------------------------------------------------ excluded photos

def validation_photos(repo: Path) -> dict[str, Path]:
    """The built-in validation photos (split "val" in facd_fast/data/builtin.py), found without importing
    facd_fast or the packages that ship them."""
    tree = ast.parse((repo / "facd_fast/data/builtin.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BuiltinPhoto":
            name, package, file, split = (arg.value for arg in node.args[:4])
            if split != "val":
                continue
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                sys.exit(f"the validation photo {name} ships in the {package} package, which this Python "
                         f"({sys.executable}) lacks: run `make setup` or set PYTHON to one that has the "
                         f"`train` extra")
            path = Path(list(spec.submodule_search_locations)[0]) / file
            if not path.is_file():
                sys.exit(f"validation photo {name}: {path} is missing")
            found[f"val:{name}"] = path
    if not found:
        sys.exit("found no validation photo in facd_fast/data/builtin.py")
    return found


# ------------------------------------------------------------------------------ main

def main() -> None:
    unpacked, versions_tsv, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    repo = Path(__file__).resolve().parent.parent
    versions = dict(line.split("\t") for line in versions_tsv.read_text().splitlines() if line)
    start = time.time()

    held_out = sorted((unpacked / "mate-backgrounds" / MATE_NATURE).glob("*.jpg"))
    if len(held_out) != 12:
        sys.exit(f"expected the 12 held-out photos in mate-backgrounds/{MATE_NATURE}, found {len(held_out)}")
    excluded_files = {f"held-out:{p.stem}": p for p in held_out}
    excluded_files.update(validation_photos(repo))
    excluded_images = {name: decode(path) for name, path in excluded_files.items()}
    excluded = {name: Signature(image) for name, image in excluded_images.items()}
    excluded_bytes = {hashlib.sha256(p.read_bytes()).hexdigest(): n for n, p in excluded_files.items()}
    excluded_pixels = {pixels_sha256(image): n for n, image in excluded_images.items()}
    lowest = self_test(excluded, {n: im for n, im in excluded_images.items() if n.startswith("held-out:")})
    print(f"near-duplicate check: {len(excluded)} excluded photos (12 held-out, {len(excluded) - 12} validation); "
          f"self-test: derived copies of the held-out photos score >= {lowest:.3f} (flagged at >= {EXCLUDE_AT})")
    if lowest < EXCLUDE_AT:
        sys.exit("the near-duplicate check missed a derived copy of a held-out photo in its self-test; nothing written")

    out.mkdir(parents=True, exist_ok=True)
    kept: list[tuple[Photo, Signature]] = []
    rows, refused, dropped, report = [], [], [], []
    closest_pair = ("", "", -1.0)
    for photo in PHOTOS:
        source = unpacked / photo.package / photo.path
        if not source.is_file():
            sys.exit(f"{photo.package} {versions.get(photo.package, '?')} has no {photo.path}: the package changed; "
                     f"update PHOTOS in {Path(__file__).name}")
        image = decode(source)
        if max(image.size) < MIN_SOURCE_SIDE:
            sys.exit(f"{photo.name}: {image.width}x{image.height} is below the {MIN_SOURCE_SIDE}-pixel rule")
        signature = Signature(image)
        file_hash, pixel_hash = hashlib.sha256(source.read_bytes()).hexdigest(), pixels_sha256(image)
        scores = {name: score(signature, other) for name, other in excluded.items()}
        closest = max(scores, key=scores.get)
        report.append((photo.name, closest, scores[closest]))
        exact = excluded_bytes.get(file_hash) or excluded_pixels.get(pixel_hash)
        if exact or scores[closest] >= EXCLUDE_AT:
            refused.append((photo.name, exact or closest, 1.0 if exact else scores[closest]))
            print(f"REFUSED {photo.name}: matches {exact or closest} "
                  f"({'identical' if exact else f'score {scores[closest]:.3f}'})")
            continue
        within = [(other.name, score(signature, other_signature)) for other, other_signature in kept]
        twin = max(within, key=lambda pair: pair[1], default=None)
        if twin and twin[1] >= DEDUP_AT:
            dropped.append((photo.name, *twin))
            print(f"dropped {photo.name}: a near-duplicate of {twin[0]} (score {twin[1]:.3f})")
            continue
        if twin and twin[1] > closest_pair[2]:
            closest_pair = (photo.name, *twin)
        kept.append((photo, signature))

        factor = max(MIN_FACTOR, max(image.size) / MAX_SIDE)
        size = (round(image.width / factor), round(image.height / factor))
        small = image.resize(size, Image.LANCZOS)
        target = out / f"{photo.name}.png"
        partial = target.with_name(f".{target.name}.partial")
        small.save(partial, format="PNG")
        os.replace(partial, target)
        rows.append((photo.name, photo.package, versions[photo.package], photo.path, photo.licence, photo.author,
                     f"{image.width}x{image.height}", f"{size[0]}x{size[1]}", file_hash,
                     hashlib.sha256(target.read_bytes()).hexdigest(), pixels_sha256(small)))

    header = ("name", "package", "version", "path", "licence", "author", "source_size", "size", "source_sha256",
              "sha256", "pixels_sha256")
    with open(out / "MANIFEST.tsv", "w") as manifest:
        for row in (header, *rows):
            manifest.write("\t".join(row) + "\n")
    with open(out / "NEAR_DUPLICATES.tsv", "w") as near:
        near.write("name\tclosest_excluded_photo\tscore\n")
        for name, closest, value in report:
            near.write(f"{name}\t{closest}\t{value:.3f}\n")
    licences = out / "copyright"
    licences.mkdir(exist_ok=True)
    for package in sorted({photo.package for photo, _ in kept}):
        shutil.copyfile(unpacked / package / "usr/share/doc" / package / "copyright", licences / f"{package}.txt")
    stale = sorted(p.name for p in out.glob("*.png") if p.stem not in {r[0] for r in rows})
    if stale:
        print(f"note: {out} also holds {len(stale)} PNG files not in this set: {', '.join(stale[:5])}...")

    pixels = sum(int(r[7].split("x")[0]) * int(r[7].split("x")[1]) for r in rows)
    print(f"\nwrote {len(rows)} photos to {out} ({pixels / 1e6:.1f} Mpixels) in {time.time() - start:.0f} s")
    for package in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == package]
        sides = sorted(max(map(int, r[7].split("x"))) for r in mine)
        print(f"  {len(mine):3d}  {package} {versions[package]}  (long side {sides[0]}-{sides[-1]} px)")
    worst = max(report, key=lambda r: r[2])
    print(f"closest to an excluded photo: {worst[0]} ~ {worst[1]} (score {worst[2]:.3f}; flagged at >= {EXCLUDE_AT})")
    if closest_pair[0]:
        print(f"closest pair kept within the set: {closest_pair[0]} ~ {closest_pair[1]} "
              f"(score {closest_pair[2]:.3f}; dropped at >= {DEDUP_AT})")
    print(f"refused (held-out or validation duplicates): {len(refused)}; dropped (duplicates within the set): "
          f"{len(dropped)}")
    if refused:
        sys.exit(3)


if __name__ == "__main__":
    main()
