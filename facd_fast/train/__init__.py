"""Training: configs, the distillation model and the loop, training states, evaluation and the demo.

    load_config(path, overrides)        TOML config over DEFAULTS, with section.key=value overrides
    Trainer(config, mode=...).fit()     train-teacher / distill loop (DDP under torchrun)
    Distiller                           what a step computes: networks, taps, DR adapters, teacher, objective
    DistillationObjective               docs/loss.md's training objective as a weighted sum of named terms
    register_term(name)                 add a loss term (a LossTerm subclass or a function of TermInputs)
    evaluate / load_model               the exact Y-PSNR/SSIM protocol on a benchmark folder

Modules: config (TOML configs), trainer (the loop), distiller (the model side), student
(StudentWithAdapters), terms (the registry and the built-in terms), objective, feature_losses,
guard (divergence), precision (student amp, teacher precision), step_timer (the bench's phases),
distributed (torchrun process group), seeding (seeds and determinism), data_folders
(train/val folders), batches, validation, resume (what --resume may change), ema, training_state
(resumable checkpoints), run_log, evaluate, plots, demo, and the study package (``facd study``:
grid, runner, records, report).
"""
from .config import DEFAULTS, METHODS, ConfigError, load_config
from .objective import DistillationObjective
from .terms import LossTerm, TermInputs, register_term

__all__ = ["DEFAULTS", "METHODS", "ConfigError", "load_config", "DistillationObjective", "LossTerm", "TermInputs",
           "register_term"]
