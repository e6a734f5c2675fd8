"""Image decoding: every kind of file gives the 8-bit RGB a viewer shows; a bad file is named."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facd_fast.data.images import ImageReadError, image_size, read_rgb
from image_files import write_png16, write_truncated

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


def over_white(colour, alpha, full_scale):
    """The reference compositing: colour * a + white * (1 - a), on [0, 1], to 8 bits."""
    a = alpha.astype(np.float64)[..., None] / full_scale
    return np.rint((colour.astype(np.float64) / full_scale * a + (1 - a)) * 255).astype(np.uint8)


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_8_bit_rgb_is_read_unchanged(tmp_path):
    for name in ("a.png", "a.bmp", "a.tif", "a.ppm"):
        np.testing.assert_array_equal(read_rgb(save(tmp_path, name, Image.fromarray(RGB))), RGB)


def test_grey_is_repeated_over_three_channels(tmp_path):
    out = read_rgb(save(tmp_path, "g.png", Image.fromarray(GREY)))
    np.testing.assert_array_equal(out, np.repeat(GREY[..., None], 3, axis=-1))


def test_bilevel(tmp_path):
    bits = GREY > 127
    out = read_rgb(save(tmp_path, "b.png", Image.fromarray(bits)))
    np.testing.assert_array_equal(out, np.repeat(np.where(bits, 255, 0)[..., None], 3, axis=-1).astype(np.uint8))


def test_grey_alpha_and_rgba_are_composited_over_white(tmp_path):
    la = Image.fromarray(np.stack([GREY, ALPHA], -1), mode="LA")
    np.testing.assert_array_equal(read_rgb(save(tmp_path, "la.png", la)),
                                  over_white(np.repeat(GREY[..., None], 3, -1), ALPHA, 255))
    rgba = Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), mode="RGBA")
    np.testing.assert_array_equal(read_rgb(save(tmp_path, "rgba.png", rgba)), over_white(RGB, ALPHA, 255))
    opaque = Image.fromarray(np.concatenate([RGB, np.full_like(ALPHA, 255)[..., None]], -1), mode="RGBA")
    np.testing.assert_array_equal(read_rgb(save(tmp_path, "opaque.png", opaque)), RGB)


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    image = Image.fromarray((GREY % 3).astype(np.uint8), mode="P")
    image.putpalette(palette)
    expected = np.array(palette, dtype=np.uint8).reshape(3, 3)[GREY % 3]
    np.testing.assert_array_equal(read_rgb(save(tmp_path, "p.png", image)), expected)
    transparent = read_rgb(save(tmp_path, "pt.png", image, transparency=1))  # green is transparent: white shows
    np.testing.assert_array_equal(transparent, np.where((GREY % 3 == 1)[..., None], 255, expected).astype(np.uint8))


def test_cmyk_is_converted(tmp_path):
    cmyk = np.zeros((1, 4, 4), dtype=np.uint8)
    cmyk[0, 1] = (255, 0, 0, 0)  # cyan
    cmyk[0, 2] = (0, 0, 0, 255)  # black
    cmyk[0, 3] = (0, 255, 255, 0)  # red
    path = save(tmp_path, "c.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=100)
    out = read_rgb(path).astype(int)
    expected = np.array([[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])
    assert np.abs(out[0] - expected).max() <= 8  # JPEG at quality 100
    tiff = read_rgb(save(tmp_path, "c.tif", Image.fromarray(cmyk, mode="CMYK")))
    np.testing.assert_array_equal(tiff[0], expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey-alpha", "rgb", "rgba"])
def test_16_bit_pngs_are_scaled_not_clipped(tmp_path, channels):
    samples = RNG.integers(0, 65536, (5, 7, channels), dtype=np.uint16)
    samples[0, 0] = 65535
    samples[0, 1] = 0
    samples[0, 2] = 257 * 100  # an 8-bit value stored as 16 bits comes back exactly
    out = read_rgb(write_png16(tmp_path / "x.png", samples if channels > 1 else samples[..., 0]))
    colour = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, -1)
    if channels in (2, 4):
        expected = over_white(colour, samples[..., -1], 65535)
    else:
        expected = np.rint(colour / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    if channels in (1, 3):
        assert (out[0, 2] == 100).all() and (out[0, 0] == 255).all()
        assert out.astype(float).mean() < 200  # random 16-bit data averages mid-grey, not near white


def test_exif_orientation_is_applied(tmp_path):
    from PIL import ImageOps

    for orientation in range(1, 9):
        image = Image.fromarray(RGB)
        exif = image.getexif()
        exif[0x0112] = orientation
        path = save(tmp_path, f"o{orientation}.jpg", image, exif=exif, quality=100)
        with Image.open(path) as opened:
            expected = np.array(ImageOps.exif_transpose(opened).convert("RGB"))
        out = read_rgb(path)
        np.testing.assert_array_equal(out, expected)
        assert image_size(path) == out.shape[:2]


@pytest.mark.parametrize("kind", ["empty", "text", "truncated-png", "truncated-jpeg", "float"])
def test_unreadable_files_raise_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image at all\n")
    elif kind == "truncated-png":
        write_truncated(path, save(tmp_path, "whole.png", Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))))
    elif kind == "truncated-jpeg":
        path = write_truncated(tmp_path / "t.jpg", save(tmp_path, "whole.jpg", Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))))
    else:
        path = save(tmp_path, "f.tif", Image.fromarray(np.ones((4, 4), dtype=np.float32)))
    with pytest.raises(ImageReadError, match=str(path)) as caught:
        read_rgb(path)
    assert caught.value.path == Path(path)
    assert isinstance(caught.value, ValueError)
