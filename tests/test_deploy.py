"""Deployment: self-ensemble, tiled inference, ``facd upscale``, ``facd eval --self-ensemble/--tile``, ONNX export."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facd_fast import data, metrics, models
from facd_fast.cli import main
from facd_fast.data import images
from facd_fast.deploy import has_global_context, receptive_radius, self_ensemble, super_resolve, tiled_forward
from facd_fast.deploy.inference import ENSEMBLE_SIZE, dihedral, dihedral_inverse
from facd_fast.deploy.onnx_export import check_crops, export_onnx, onnx_session


def tiny_edsr(scale=2, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build("edsr-demo-student", scale, **{"num_block": 2, "num_feat": 8, **overrides}).eval()


def tiny_rcan(scale=2, seed=0):
    torch.manual_seed(seed)
    return models.build("rcan-student", scale, num_group=2, num_block=2, num_feat=16, reduction=4).eval()


@pytest.fixture(scope="module")
def photo_lr():
    """(1, 3, 37, 53) float32 centre crop of a real held-out photo."""
    return check_crops(sizes=[(37, 53)])[0]


@pytest.fixture
def checkpoint(tmp_path):
    return models.save_checkpoint_basicsr(tiny_edsr(), tmp_path / "tiny.pth")


# ---------------------------------------------------------------------------------------------------- inference

@pytest.mark.parametrize("scale", [2, 3, 4])
def test_receptive_radius_bounds_the_gradient_support(scale):
    network = tiny_edsr(scale).double()
    size = 2 * receptive_radius(network) + 9
    x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    centre = size // 2 * scale
    network(x)[0, :, centre, centre].sum().backward()
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0), as_tuple=True)
    reach = max(size // 2 - rows.min().item(), rows.max().item() - size // 2,
                size // 2 - cols.min().item(), cols.max().item() - size // 2)
    # 1 + 2 * num_block + 1 convs at LR resolution, plus the upsampler's and conv_last's at higher resolutions.
    assert receptive_radius(network) - 1 <= reach <= receptive_radius(network)


def test_rcan_is_flagged_as_seeing_the_whole_image():
    assert has_global_context(tiny_rcan()) and not has_global_context(tiny_edsr())


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiled_equals_whole_image_after_8_bit_quantisation_at_the_receptive_radius(photo_lr, scale):
    network = tiny_edsr(scale, num_block=3).double()
    lr = photo_lr.double()
    radius = receptive_radius(network)
    with torch.no_grad():
        whole = network(lr)
        tiled = super_resolve(network, lr, tile=16, batch=2)  # default overlap: the receptive radius
        seamed = super_resolve(network, lr, tile=16, tile_overlap=radius // 3)
    assert tiled.shape == whole.shape == (1, 3, 37 * scale, 53 * scale)
    assert (tiled - whole).abs().max().item() < 1e-12
    assert np.array_equal(metrics.to_uint8_image(tiled[0]), metrics.to_uint8_image(whole[0]))
    # A smaller overlap shows the seams (so the equality above is not vacuous).
    assert (seamed - whole).abs().max().item() > 1e-3


def test_tiled_float32_agrees_with_whole_image_to_rounding(photo_lr):
    network = tiny_edsr(2, num_block=3)
    with torch.no_grad():
        whole = network(photo_lr)
        tiled = super_resolve(network, photo_lr, tile=12)
    assert (tiled - whole).abs().max().item() < 1e-5


def test_tiled_forward_covers_every_pixel_once():
    """An identity 'network' at scale 1 must give back its input through any tiling."""
    lr = torch.rand(2, 3, 23, 17)
    for tile, overlap, batch in [(5, 0, 1), (8, 3, 4), (40, 2, 1), (1, 1, 7)]:
        assert torch.equal(tiled_forward(lambda x: x.clone(), lr, 1, tile, overlap, batch), lr)


def test_dihedral_transforms_are_the_eight_distinct_symmetries_and_invert():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    transformed = [dihedral(x, i) for i in range(ENSEMBLE_SIZE)]
    assert len({tuple(t.flatten().tolist()) + tuple(t.shape) for t in transformed}) == ENSEMBLE_SIZE
    for index, t in enumerate(transformed):
        assert torch.equal(dihedral_inverse(t, index), x)


def symmetrised(network: nn.Module) -> nn.Module:
    """``network`` (EDSR x2) made equivariant to flips and transposes by construction.

    Every 3x3 kernel is averaged over the 8 symmetries of the square; the
    upsampler's conv gives its 4 sub-pixel outputs the same kernel, so
    PixelShuffle becomes a nearest-neighbour upsampling (itself equivariant).
    """
    with torch.no_grad():
        for conv in network.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(sum(dihedral(conv.weight, i) for i in range(ENSEMBLE_SIZE)) / ENSEMBLE_SIZE)
        upsample_conv = network.upsample[0]
        shared = upsample_conv.weight[::4].clone(), upsample_conv.bias[::4].clone()
        upsample_conv.weight.copy_(shared[0].repeat_interleave(4, dim=0))
        upsample_conv.bias.copy_(shared[1].repeat_interleave(4, dim=0))
    return network


def test_self_ensemble_of_an_equivariant_network_is_its_plain_output(photo_lr):
    network = symmetrised(tiny_edsr(2).double())
    lr = photo_lr.double()
    with torch.no_grad():
        plain = network(lr)
        assert (network(lr.flip(-1).transpose(-1, -2)) - plain.flip(-1).transpose(-1, -2)).abs().max() < 1e-12
        ensembled = super_resolve(network, lr, ensemble=True)
        ensembled_tiled = super_resolve(network, lr, ensemble=True, tile=16)
    assert (ensembled - plain).abs().max().item() < 1e-12
    assert (ensembled_tiled - plain).abs().max().item() < 1e-12


def test_self_ensemble_averages_all_eight_rotations_and_flips(photo_lr):
    """Against an independent construction: rot90 by k quarter turns, with and without a flip first."""
    network = tiny_edsr(2).double()
    lr = photo_lr.double()
    with torch.no_grad():
        outputs = []
        for flip in (False, True):
            for turns in range(4):
                x = lr.flip(-1) if flip else lr
                y = torch.rot90(network(torch.rot90(x, turns, (2, 3))), -turns, (2, 3))
                outputs.append(y.flip(-1) if flip else y)
        expected = torch.stack(outputs).mean(0)
        got = self_ensemble(network)(lr)
    assert (got - expected).abs().max().item() < 1e-12
    assert (got - network(lr)).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------------- upscale

def write_mixed_folder(folder):
    """One image of each kind a folder may hold (and a file that is not an image)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (14, 18, 1), dtype=np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(rgb[:10, :12]).save(folder / "small.bmp")
    (folder / "notes.txt").write_text("not an image")
    return sorted(p for p in folder.iterdir() if p.suffix != ".txt")


def test_upscale_folder_of_mixed_image_kinds(checkpoint, tmp_path, capsys):
    sources = write_mixed_folder(tmp_path / "in")
    extra = tmp_path / "single.png"
    Image.fromarray(np.full((9, 7, 3), 200, np.uint8)).save(extra)
    out = tmp_path / "out"
    assert main(["upscale", str(checkpoint), str(tmp_path / "in"), str(extra), "--out", str(out)]) == 0
    assert "wrote 8 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in sources + [extra])
    network = models.model_from_checkpoint(checkpoint).eval()
    for source in sources + [extra]:
        decoded = images.read_rgb(source)  # the decoding `facd eval` uses
        with torch.no_grad():
            expected = metrics.to_uint8_image(network(images.to_tensor(decoded)[None])[0])
        with Image.open(out / f"{source.stem}.png") as written:
            assert written.mode == "RGB"
            assert np.array_equal(np.array(written), expected), source.name


def test_upscale_tiled_batched_and_ensembled_matches_the_library(checkpoint, tmp_path):
    sources = [p for p in write_mixed_folder(tmp_path / "in") if p.stem in ("rgba", "small")]
    out = tmp_path / "out"
    assert main(["upscale", str(checkpoint), *map(str, sources), "--out", str(out), "--tile", "7",
                 "--tile-overlap", "3", "--batch", "3", "--self-ensemble"]) == 0
    network = models.model_from_checkpoint(checkpoint).eval()
    for source in sources:
        lr = images.to_tensor(images.read_rgb(source))[None]
        expected = metrics.to_uint8_image(super_resolve(network, lr, tile=7, tile_overlap=3, ensemble=True)[0])
        with Image.open(out / f"{source.stem}.png") as written:
            assert np.array_equal(np.array(written), expected), source.name


def test_upscale_batches_images_of_one_size(checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, size in enumerate([(8, 8), (8, 8), (6, 9), (8, 8)]):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"{index}.png")
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["upscale", str(checkpoint), str(folder), "--out", str(one)]) == 0
    assert main(["upscale", str(checkpoint), str(folder), "--out", str(three), "--batch", "3"]) == 0
    for index in range(4):
        a, b = np.array(Image.open(one / f"{index}.png")), np.array(Image.open(three / f"{index}.png"))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    # A progress bar may have started on stderr before the error; the error itself is one line, no traceback.
    lines = [line for line in captured.err.splitlines() if line.startswith("facd: error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_upscale_bad_inputs_get_one_error_line_and_nothing_is_overwritten(checkpoint, tmp_path, capsys):
    folder = tmp_path / "in"
    write_mixed_folder(folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "rgb.png").write_bytes(b"keep me")
    base = ["upscale", str(checkpoint)]
    assert "rgb.png' exists" in one_line_error(capsys, base + [str(folder), "--out", str(out)])
    assert (out / "rgb.png").read_bytes() == b"keep me" and sorted(p.name for p in out.iterdir()) == ["rgb.png"]
    assert "is one of the inputs" in one_line_error(capsys, base + [str(folder), "--out", str(folder),
                                                                    "--overwrite"])
    assert "does not exist" in one_line_error(capsys, base + [str(tmp_path / "nope.png"), "--out", str(out)])
    assert "not an image file" in one_line_error(capsys, base + [str(folder / "notes.txt"), "--out", str(out)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in one_line_error(capsys, base + [str(empty), "--out", str(out)])
    assert "would both be written" in one_line_error(
        capsys, base + [str(folder / "rgb.png"), str(folder / "photo.jpg"), str(tmp_path / "in" / "rgb.png"),
                        "--out", str(tmp_path / "o2")])
    assert "--tile must be >= 1" in one_line_error(capsys, base + [str(folder), "--out", str(out), "--tile", "0"])
    assert "--tile-overlap needs --tile" in one_line_error(capsys, base + [str(folder), "--out", str(out),
                                                                           "--tile-overlap", "4"])
    assert "--batch must be >= 1" in one_line_error(capsys, base + [str(folder), "--out", str(out), "--batch", "0"])
    assert "--device" in one_line_error(capsys, base + [str(folder), "--out", str(tmp_path / "o3"),
                                                        "--device", "tpu:banana"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert "bad.png" in one_line_error(capsys, base + [str(broken), "--out", str(tmp_path / "o4")])
    assert "does not exist" in one_line_error(capsys, ["upscale", str(tmp_path / "none.pth"), str(folder),
                                                       "--out", str(tmp_path / "o5")])


# ---------------------------------------------------------------------------------------------------- eval

def test_eval_json_says_which_protocol_was_used(checkpoint, tmp_path, capsys):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (32, 28, 3), dtype=np.uint8)).save(
            hr_dir / f"{index}.png")
    base = ["eval", str(checkpoint), "--hr-dir", str(hr_dir), "--scale", "2", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--self-ensemble", "--tile", "6"]) == 0
    tiled = json.loads(capsys.readouterr().out)
    radius = receptive_radius(models.model_from_checkpoint(checkpoint))
    assert (plain["self_ensemble"], plain["tile"], plain["tile_overlap"]) == (False, None, None)
    assert (tiled["self_ensemble"], tiled["tile"], tiled["tile_overlap"]) == (True, 6, radius)
    network = models.model_from_checkpoint(checkpoint).eval()
    name, lr, hr = data.BenchmarkFolder(hr_dir, 2)[0]
    sr = super_resolve(network, lr[None], ensemble=True, tile=6)[0]
    expected = metrics.psnr_y(metrics.to_uint8_image(sr), metrics.to_uint8_image(hr), 2)
    assert tiled["images"][0]["psnr_y"] == pytest.approx(expected, abs=1e-9)
    assert tiled["mean_psnr_y"] != plain["mean_psnr_y"]


# ---------------------------------------------------------------------------------------------------- ONNX

@pytest.mark.slow
@pytest.mark.parametrize("build", [tiny_edsr, tiny_rcan], ids=["edsr", "rcan"])
def test_onnx_export_round_trips_through_onnx_runtime(build, tmp_path):
    network = build()
    report = export_onnx(network, tmp_path / "model.onnx", check_inputs=check_crops(sizes=[(20, 26), (13, 31)]))
    assert [c["shape"] for c in report["checks"]] == [[1, 3, 20, 26], [1, 3, 13, 31]]
    assert report["max_abs_diff"] <= 1e-4 and report["tolerance"] == 1e-4
    # A third size and a batch of two, unseen by the export: the dimensions are dynamic.
    session = onnx_session(tmp_path / "model.onnx", threads=1)
    lr = torch.rand(2, 3, 11, 9)
    with torch.no_grad():
        expected = network(lr).numpy()
    got = session.run(None, {"lr": lr.numpy()})[0]
    assert got.shape == (2, 3, 22, 18) and np.abs(got - expected).max() <= 1e-4
    metadata = {p.key: p.value for p in __import__("onnx").load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(metadata["facd_fast"])["config"] == network.config()


def test_export_onnx_command_checks_a_real_photo(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "96x128:" in printed and "61x83:" in printed and "tolerance 0.0001" in printed
    assert out.is_file()


def test_failed_onnx_check_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ValueError, match="not written"):
        export_onnx(tiny_edsr(), target, check_inputs=check_crops(sizes=[(12, 12)]), tolerance=-1.0)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
