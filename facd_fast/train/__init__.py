"""Training: configs, the distillation trainer, training states, evaluation and the demo.

    load_config(path, overrides)        TOML config over DEFAULTS, with section.key=value overrides
    Trainer(config, mode=...).fit()     train-teacher / distill loop (DDP under torchrun)
    DistillationObjective               spec section 5's loss and the baselines' (none, fd-l1, fd-l2, fakd, facd, facd-nomask)
    evaluate / load_model               the exact Y-PSNR/SSIM protocol on a benchmark folder

Modules: config (TOML configs), trainer (the loop), student (StudentWithAdapters),
distributed (torchrun process group), seeding (seeds and determinism), data_folders
(train/val folders), precision (autocast_for), objective and feature_losses (the loss),
ema, training_state (resumable checkpoints), run_log, evaluate, plots, demo.
"""
from .config import DEFAULTS, METHODS, ConfigError, load_config
from .objective import DistillationObjective

__all__ = ["DEFAULTS", "METHODS", "ConfigError", "load_config", "DistillationObjective"]
