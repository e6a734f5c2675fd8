"""Super-resolution networks for FACD: EDSR and RCAN with BasicSR's parameter names.

    build(name, scale=4, **overrides)         a preset (PRESETS) as an nn.Module
    build_network(spec, scale, kwargs)        a preset or a user's "package.module:function" factory
    model(x, return_features=True)            -> (sr, [tap features])
    DRAdapters(student_ch, teacher_ch, J)     the FACD DR blocks, kept outside the student
    load_pretrained / model_from_checkpoint   BasicSR, EDSR-PyTorch, official RCAN and our files
    save_checkpoint_basicsr                   BasicSR-format export with our architecture record
    model_meta / model_file_dict              that record, and an export's in-memory form
"""
from .adapters import DRAdapters
from .checkpoints import (check_finite, detect_layout, infer_config, load_pretrained, model_file_dict,
                          model_from_checkpoint, model_meta, read_checkpoint, save_checkpoint_basicsr,
                          to_basicsr_keys)
from .edsr import EDSR
from .factory import build_network, default_taps, factory_record, is_factory_spec, network_scale
from .network import DIV2K_RGB_MEAN
from .presets import ARCHS, PRESETS, build, count_parameters, from_config
from .rcan import RCAN

__all__ = ["EDSR", "RCAN", "ARCHS", "PRESETS", "DIV2K_RGB_MEAN", "DRAdapters", "build", "from_config",
           "count_parameters", "load_pretrained", "save_checkpoint_basicsr", "model_from_checkpoint",
           "detect_layout", "infer_config", "to_basicsr_keys", "model_meta", "model_file_dict",
           "read_checkpoint", "check_finite", "build_network", "default_taps", "factory_record",
           "is_factory_spec", "network_scale"]
