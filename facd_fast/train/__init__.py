"""Training: configs, the distillation trainer, checkpoints, evaluation, the step benchmark and the demo.

    load_config(path, overrides)        TOML config over DEFAULTS, with section.key=value overrides
    Trainer(config, mode=...).fit()     train-teacher / distill loop (DDP under torchrun)
    DistillationObjective               spec section 5's loss and the baselines' (none, fd-l1, fd-l2, fakd, facd, facd-nomask)
    evaluate / load_model               the exact Y-PSNR/SSIM protocol on a benchmark folder
"""
from .config import DEFAULTS, METHODS, ConfigError, load_config
from .objective import DistillationObjective

__all__ = ["DEFAULTS", "METHODS", "ConfigError", "load_config", "DistillationObjective"]
