"""Deploying a trained network: tiled and self-ensembled inference, ``facd upscale``, ONNX export.

    super_resolve(network, lr, tile=, tile_overlap=, ensemble=)   whole-image or tiled, optionally x8 ensembled
    tiled_forward(forward, lr, scale, tile, overlap)              any forward on tiles, in bounded memory
    self_ensemble(forward)                                        the x8 flip/rotate ensemble of a forward
    receptive_radius(network), has_global_context(network)        the overlap that makes tiling exact
    upscale_files(network, inputs, out_dir, ...)                  files and folders in, PNGs out
    export_onnx(network, path)                                    ONNX (dynamic N, H, W), checked by ONNX Runtime

Depends on models, data and metrics only; ``onnx_export`` needs the ``deploy`` extra.
"""
from .inference import has_global_context, receptive_radius, self_ensemble, super_resolve, tiled_forward
from .upscale import collect_inputs, resolve_device, upscale_files

__all__ = ["super_resolve", "tiled_forward", "self_ensemble", "receptive_radius", "has_global_context",
           "upscale_files", "collect_inputs", "resolve_device"]
