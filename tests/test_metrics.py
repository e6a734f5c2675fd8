"""Y-PSNR / Y-SSIM by the BasicSR protocol: worked values, an independent SSIM, numpy vs torch."""
import math

import numpy as np
import pytest
import torch

from facd_fast.metrics import gaussian_window, psnr_y, psnr_y_torch, rgb_to_y, ssim_y, to_uint8_image


def _gray(value, shape=(16, 16)):
    return np.full((*shape, 3), value, dtype=np.uint8)


def test_rgb_to_y_worked_values():
    image = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]],
                     dtype=np.uint8)
    expected = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966,
                16 + (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255]
    np.testing.assert_allclose(rgb_to_y(image)[0], expected, rtol=0, atol=1e-12)
    assert rgb_to_y(image).dtype == np.float64


def test_psnr_worked_values():
    # One white pixel on black, 4x4: Y differs by 219 at one of 16 pixels.
    hr = _gray(0, (4, 4))
    sr = hr.copy()
    sr[0, 0] = 255
    assert psnr_y(sr, hr, 0) == pytest.approx(10 * math.log10(255 ** 2 / (219 ** 2 / 16)), abs=1e-12)
    assert psnr_y(sr, hr, 1) == math.inf  # the pixel is in the cropped border
    # Gray level 1 everywhere against black: Y differs by 219 / 255 everywhere.
    assert psnr_y(_gray(1), _gray(0), 4) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-12)


def test_psnr_crop_border_removes_exactly_the_border():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[2, 5:19] = 0  # only row 2 differs: inside for crop 2, outside for crop 3
    assert math.isfinite(psnr_y(sr, hr, 2))
    assert psnr_y(sr, hr, 3) == math.inf


def test_gaussian_window_is_opencvs():
    window = gaussian_window()
    assert window.shape == (11,) and window.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(window / window[5], np.exp(-((np.arange(11) - 5) ** 2) / 4.5), rtol=1e-14)


def test_ssim_identical_is_one_and_constant_pair_is_worked():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert ssim_y(image, image, 3) == pytest.approx(1.0, abs=1e-12)
    # Constant images: every sigma is 0, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with a, b their Y.
    c1 = (0.01 * 255) ** 2
    assert ssim_y(_gray(255), _gray(0), 2) == pytest.approx((2 * 235 * 16 + c1) / (235 ** 2 + 16 ** 2 + c1), abs=1e-12)


def _ssim_by_windows(y1, y2):
    """Straightforward SSIM: one weighted mean per 11x11 window position ('valid'), C1, C2 of BasicSR."""
    window = np.outer(gaussian_window(), gaussian_window())
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(y1.shape[0] - 10):
        for j in range(y1.shape[1] - 10):
            a, b = y1[i:i + 11, j:j + 11], y2[i:i + 11, j:j + 11]
            mu_a, mu_b = (window * a).sum(), (window * b).sum()
            var_a = (window * (a - mu_a) ** 2).sum()
            var_b = (window * (b - mu_b) ** 2).sum()
            cov = (window * (a - mu_a) * (b - mu_b)).sum()
            numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
            values.append(numerator / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_an_independent_implementation():
    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (23, 27, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-40, 41, hr.shape), 0, 255).astype(np.uint8)
    expected = _ssim_by_windows(rgb_to_y(sr[2:-2, 2:-2]), rgb_to_y(hr[2:-2, 2:-2]))
    assert ssim_y(sr, hr, 2) == pytest.approx(expected, abs=1e-10)
    assert 0 < expected < 1


def test_torch_psnr_agrees_with_numpy():
    torch.manual_seed(0)
    hr = torch.rand(3, 3, 21, 19)
    sr = (hr + 0.05 * torch.randn_like(hr))  # leaves [0, 1] at places: the clamp is exercised
    got = psnr_y_torch(sr, hr, 3)
    assert got.shape == (3,) and got.dtype == torch.float64
    expected = [psnr_y(to_uint8_image(s), to_uint8_image(h), 3) for s, h in zip(sr, hr)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)
    assert torch.isinf(psnr_y_torch(hr, hr.clone(), 2)).all()


def test_to_uint8_image_clamps_and_rounds():
    image = torch.tensor([-0.5, 0.0, 0.4 / 255, 1.4 / 255, 1.6 / 255, 1.0, 2.0]).view(1, 1, 7).expand(3, 1, 7)
    out = to_uint8_image(image)
    assert out.dtype == np.uint8 and out.shape == (1, 7, 3)
    assert out[0, :, 0].tolist() == [0, 0, 0, 1, 2, 255, 255]


@pytest.mark.parametrize("call, error, match", [
    (lambda: psnr_y(_gray(0).astype(np.float32), _gray(0), 0), ValueError, "sr must be a uint8 RGB"),
    (lambda: psnr_y(_gray(0), _gray(0)[..., 0], 0), ValueError, "hr must be a uint8 RGB"),
    (lambda: psnr_y(torch.zeros(4, 4, 3), _gray(0), 0), TypeError, "sr must be a numpy array"),
    (lambda: psnr_y(_gray(0, (8, 8)), _gray(0, (8, 9)), 0), ValueError, "same shape"),
    (lambda: psnr_y(_gray(0), _gray(0), 8), ValueError, "crop_border=8 leaves nothing"),
    (lambda: psnr_y(_gray(0), _gray(0), -1), ValueError, "crop_border must be an int >= 0"),
    (lambda: ssim_y(_gray(0, (12, 12)), _gray(0, (12, 12)), 1), ValueError, "at least 11x11"),
    (lambda: psnr_y_torch(torch.rand(3, 8, 8), torch.rand(3, 8, 8), 0), ValueError, r"sr must be a float tensor"),
    (lambda: psnr_y_torch(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), 0), ValueError, "same shape"),
    (lambda: to_uint8_image(torch.rand(1, 3, 8, 8)), ValueError, r"\(3, H, W\)"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
