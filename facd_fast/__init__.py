"""facd_fast: fast, faithful feature-domain adaptive contrastive distillation (FACD) for SISR.

Public API:
    contrastive_loss(student, teacher, negatives=None, *, mask, distance, normalize, eps, reduction, backend)
    adaptive_mask(sr_student, sr_teacher, hr, *, margin_db, data_range)
    FACDLoss(tap_weights, use_mask=..., margin_db=...)
    FeatureTaps(model, names)       the outputs of named submodules of any network, by forward hooks
    available_backends()
The definition is in docs/loss.md; facd_fast.reference is its plain-PyTorch oracle;
docs/architecture.md maps the layers and the path of a call.
"""
from .api import adaptive_mask, available_backends, contrastive_loss, patch_mse
from .module import FACDLoss
from .taps import FeatureTaps

__version__ = "0.1.0"
__all__ = ["contrastive_loss", "adaptive_mask", "patch_mse", "FACDLoss", "FeatureTaps", "available_backends",
           "__version__"]
