"""ONNX export through torch's current exporter (``torch.onnx.export(dynamo=True)``), checked by ONNX Runtime.

The graph takes ``lr`` (N, 3, H, W) float32 RGB in [0, 1] with N, H and W
dynamic and returns ``sr`` (N, 3, H*s, W*s) float32 (not clamped, as the
PyTorch forward). The architecture record (``model.config()``) is stored in
the model's metadata under ``facd_fast``. Needs the ``deploy`` extra:
``pip install 'facd-fast[deploy]'`` (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data import images, read_builtin_photo
from ..models.checkpoints import METADATA_KEY, model_meta

#: fp32 agreement required between ONNX Runtime and the PyTorch forward (outputs on the [0, 1] scale).
ONNX_TOLERANCE = 1e-4
#: The real photo the export is checked on (a held-out photo of the built-in set) and the LR crops taken from it.
CHECK_PHOTO = "monarch"
CHECK_SIZES = ((96, 128), (61, 83))


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"ONNX export needs {module}: pip install 'facd-fast[deploy]' "
                          f"(onnx, onnxruntime, onnxscript)") from None


def check_crops(photo: Optional[np.ndarray] = None,
                sizes: Sequence[tuple[int, int]] = CHECK_SIZES) -> list[torch.Tensor]:
    """Centre crops (1, 3, h, w) float32 of a real photo (default: the built-in ``CHECK_PHOTO``), one per size."""
    photo = read_builtin_photo(CHECK_PHOTO) if photo is None else photo
    image = images.to_tensor(photo)
    crops = []
    for height, width in sizes:
        if height > image.shape[1] or width > image.shape[2]:
            raise ValueError(f"check size {height}x{width} exceeds the photo's {image.shape[1]}x{image.shape[2]}")
        top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
        crops.append(image[None, :, top:top + height, left:left + width].contiguous())
    return crops


def onnx_session(path: str | Path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads, default ORT's)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_with_onnxruntime(network: nn.Module, path: str | Path, inputs: Sequence[torch.Tensor]) -> list[dict]:
    """Run ``path`` in ONNX Runtime and ``network`` in PyTorch on each input; the max abs difference of each."""
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name
    network = network.eval()
    results = []
    for lr in inputs:
        expected = network(lr.float()).numpy()
        got = session.run(None, {input_name: lr.float().numpy()})[0]
        if got.shape != expected.shape:
            raise ValueError(f"ONNX Runtime output {got.shape} differs in shape from PyTorch's {expected.shape}")
        results.append({"shape": list(lr.shape), "max_abs_diff": float(np.abs(got - expected).max())})
    return results


def export_onnx(network: nn.Module, path: str | Path, *, check_inputs: Optional[Sequence[torch.Tensor]] = None,
                tolerance: float = ONNX_TOLERANCE) -> dict:
    """Export ``network`` (fp32, CPU) to ONNX at ``path`` and check it with ONNX Runtime.

    The file is written beside ``path`` first and moved there only once ONNX
    Runtime's output matches the PyTorch forward within ``tolerance`` on every
    check input (default: :func:`check_crops` of a real photo, two sizes, so
    the dynamic height and width are exercised); otherwise ValueError, and
    ``path`` is left as it was.

    Returns ``{"path", "opset", "checks": [{"shape", "max_abs_diff"}, ...], "max_abs_diff", "tolerance"}``.
    """
    _require("onnx"), _require("onnxscript"), _require("onnxruntime")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export target {str(path)!r} is a folder")
    network = network.float().cpu().eval()
    check_inputs = check_crops() if check_inputs is None else list(check_inputs)
    dynamic = torch.export.Dim.DYNAMIC
    # The exporter logs that torchvision's detection ops cannot be registered when torchvision is absent,
    # and torch's own pytree code warns about a deprecation inside torch: neither concerns these networks.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            program = torch.onnx.export(network, (check_inputs[0],), dynamo=True, input_names=["lr"],
                                        output_names=["sr"], dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                                        verbose=False)
    finally:
        registration_log.setLevel(level)
    program.model.metadata_props[METADATA_KEY] = json.dumps(model_meta(network))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(handle)
    try:
        program.save(temporary)
        checks = compare_with_onnxruntime(network, temporary, check_inputs)
        worst = max(check["max_abs_diff"] for check in checks)
        if not worst <= tolerance:
            raise ValueError(f"ONNX Runtime differs from PyTorch by {worst:.3g} (> {tolerance:g}) on "
                             f"{[c['shape'] for c in checks]}; {str(path)!r} not written")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    opset = next((version for domain, version in program.model.opset_imports.items() if domain == ""), None)
    return {"path": str(path), "opset": opset, "checks": checks, "max_abs_diff": worst, "tolerance": tolerance}
