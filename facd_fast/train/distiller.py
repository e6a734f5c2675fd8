"""The distillation model: what one training step computes (BasicSR's model, apart from the loop).

:class:`Distiller` holds the student (a preset or a network of the user's own,
:func:`facd_fast.models.build_network`), its feature taps and DR adapters, the
frozen teacher with its taps and precision, and the objective; its
:meth:`Distiller.losses` is a step's forward and loss. The loop
(:class:`facd_fast.train.trainer.Trainer`) decides when to step, and owns the
optimiser, the schedule, the divergence guard, checkpoints and logs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import models
from ..resources import resolve_path
from ..taps import FeatureTaps, check_tap_names
from .config import Config, ConfigError
from .diagnostics import term_gradient_norms
from .objective import DistillationObjective, mask_enabled
from .precision import (AUTO_MAX_LOSS_DB, DTYPES, autocast_for, device_capabilities, precision_context,
                        resolve_teacher_precision, teacher_precision_gap)
from .step_timer import StepTimer
from .student import StudentWithAdapters


def build_objective(config: Config, method: str) -> DistillationObjective:
    distill = config["distill"]
    return DistillationObjective(
        method, alpha=distill["alpha"], feature_weight=distill["lambda"], tap_weights=distill["tap_weights"],
        use_mask=mask_enabled(method, distill["use_mask"]), margin_db=distill["margin_db"],
        distance=distill["distance"], normalize=distill["normalize"], backend=distill["backend"],
        terms=distill["terms"] if method != "none" else {},
    )


def teacher_checkpoint_path(config: Config, method: str) -> Path:
    """The file ``model.teacher_checkpoint`` names; an error naming the setting when there is none."""
    setting = config["model"]["teacher_checkpoint"]
    if not setting:
        raise ConfigError(f"model.teacher_checkpoint is required to distil (method {method!r})")
    path = resolve_path(setting)
    if not path.is_file():
        where = "" if str(path) == setting else f" (looked for {str(path)!r})"
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"model.teacher_checkpoint: file {setting!r} {what}{where}")
    return path


def load_teacher(config: Config, path: Path) -> nn.Module:
    """``model.teacher`` with the weights of ``path``: a preset (any layout models.load_pretrained reads) or a factory's
    network (its own state dict)."""
    model_config = config["model"]
    spec, kwargs, scale = model_config["teacher"], model_config["teacher_kwargs"], model_config["scale"]
    where = f"model.teacher_checkpoint {model_config['teacher_checkpoint']!r}"
    try:
        if not kwargs and not models.is_factory_spec(spec):
            teacher = models.model_from_checkpoint(path, preset=spec, scale=scale)
        else:
            teacher = models.build_network(spec, scale, kwargs, what="model.teacher")
            models.load_pretrained(teacher, path)
    except ValueError as error:
        if str(error).startswith("model.teacher"):
            raise
        raise ValueError(f"{where} does not fit model.teacher = {spec!r} at model.scale = {scale} "
                         f"(a checkpoint of another scale or architecture?): {error}") from None
    return teacher


def _tap_names(network: nn.Module, setting: Sequence[str], key: str) -> List[str]:
    names = list(setting) or list(models.default_taps(network) or ())
    if not names:
        raise ConfigError(f"{key} is empty and {type(network).__name__} is not a preset with taps of its own: "
                          f"name the modules to tap, e.g. --set '{key}=[\"body.2\", \"body.5\"]'")
    return check_tap_names(network, names, key)


@torch.no_grad()
def _dry_forward(network: nn.Module, taps: Optional[FeatureTaps], lr: Tensor, key: str,
                 scale: int) -> List[Tuple[int, ...]]:
    """The tap shapes of one eval-mode forward of ``lr``; ConfigError when the output is not ``scale`` x the input."""
    was_training = network.training
    network.eval()
    try:
        sr = network(lr)
    finally:
        network.train(was_training)
    expected = (lr.shape[0], 3, lr.shape[2] * scale, lr.shape[3] * scale)
    if not isinstance(sr, Tensor) or tuple(sr.shape) != expected:
        shape = tuple(sr.shape) if isinstance(sr, Tensor) else type(sr).__name__
        raise ConfigError(f"{key}: a x{scale} network (model.scale) must map {tuple(lr.shape)} to {expected}, "
                          f"got {shape}")
    return [tuple(feature.shape) for feature in taps.features()] if taps is not None else []


class Distiller:
    """The networks and the loss of a run, built from a config.

    Args:
        config: a validated config.
        mode: "teacher" (train ``model.teacher`` on the pixel term alone) or "distill".
        device: where the networks run.
        timer: the phases of :meth:`losses` are timed by it (a disabled :class:`StepTimer` costs nothing).

    Attributes: ``student`` (the bare network trained, validated and exported),
    ``trainable`` (:class:`StudentWithAdapters`: student, taps and adapters, what the
    optimiser updates), ``train_module`` (what a step calls: ``trainable``, wrapped in
    DDP and compiled as the loop asks), ``teacher`` (frozen, or None; stored for its precision,
    so call it through :meth:`teacher_forward`), ``teacher_precision``, ``objective``.
    """

    def __init__(self, config: Config, mode: str, device: torch.device, timer: Optional[StepTimer] = None) -> None:
        model_config, distill = config["model"], config["distill"]
        self.config, self.device = config, device
        self.method = "none" if mode == "teacher" else distill["method"]
        self.timer = timer or StepTimer(device)
        scale = model_config["scale"]
        trained = "teacher" if mode == "teacher" else "student"
        self.objective = build_objective(config, self.method)
        teacher_path = teacher_checkpoint_path(config, self.method) if self.objective.needs_teacher else None
        # Built in this order from the run's seed: the student's initial weights depend on nothing else.
        self.student = models.build_network(model_config[trained], scale, model_config[f"{trained}_kwargs"],
                                            what=f"model.{trained}")
        self.teacher = load_teacher(config, teacher_path) if teacher_path is not None else None
        student_taps = teacher_taps = adapters = None
        if self.objective.needs_features:
            student_taps = FeatureTaps(self.student, _tap_names(self.student, model_config["student_taps"],
                                                                "model.student_taps"))
            teacher_taps = FeatureTaps(self.teacher, _tap_names(self.teacher, model_config["teacher_taps"],
                                                                "model.teacher_taps"))
            adapters = self._adapters(student_taps, teacher_taps, config)
        self.teacher_taps = teacher_taps
        self.trainable = StudentWithAdapters(self.student, student_taps, adapters).to(device)
        if config["train"]["channels_last"]:
            self.trainable.to(memory_format=torch.channels_last)
        self.train_module: nn.Module = self.trainable
        self.teacher_precision = "fp32"
        self.precision_check: Dict[str, Any] = {}
        if self.teacher is not None:
            self.teacher = self.teacher.to(device).eval().requires_grad_(False)
            if config["train"]["channels_last"]:
                self.teacher.to(memory_format=torch.channels_last)
            self.teacher_precision = resolve_teacher_precision(distill["teacher_precision"], device.type,
                                                               **device_capabilities(device))

    def _adapters(self, student_taps: FeatureTaps, teacher_taps: FeatureTaps, config: Config) -> Optional[nn.Module]:
        """DR adapters sized from one dry forward of each network (None when no term compares adapted features)."""
        scale = config["model"]["scale"]
        # The training patch's LR side, capped: a big teacher's forward on the CPU stays short.
        side = max(1, min(config["data"]["patch_size"] // scale, 32))
        lr = torch.zeros(1, 3, side, side)
        student_shapes = _dry_forward(self.student, student_taps, lr, "model.student", scale)
        teacher_shapes = _dry_forward(self.teacher, teacher_taps, lr, "model.teacher", scale)
        if len(student_shapes) != len(teacher_shapes):
            raise ConfigError(f"model.student_taps has {len(student_shapes)} taps and model.teacher_taps "
                              f"{len(teacher_shapes)}: they are compared pairwise")
        if len(config["distill"]["tap_weights"]) != len(student_shapes):
            raise ConfigError(f"distill.tap_weights has {len(config['distill']['tap_weights'])} weights, "
                              f"the networks have {len(student_shapes)} taps")
        for j, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if s[2:] != t[2:]:
                raise ConfigError(
                    f"tap {j}: student {student_taps.names[j]!r} gives {s} and teacher {teacher_taps.names[j]!r} "
                    f"gives {t} for an LR input of {tuple(lr.shape)}: the spatial sizes must match (tap modules "
                    f"at the same resolution)")
        if not self.objective.adapted:
            return None
        # From their own seed: the global RNG (hence anything drawn after) stays as for "none".
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["run"]["seed"] + 1)
            return models.DRAdapters([s[1] for s in student_shapes], [t[1] for t in teacher_shapes],
                                     num_taps=len(student_shapes))

    def check_teacher_precision(self, pairs) -> None:
        """"auto": keep a reduced teacher precision only if the teacher's Y-PSNR on ``pairs`` ((lr, hr) validation
        crops) drops by at most AUTO_MAX_LOSS_DB from fp32's; else fall back to fp32. Without validation crops (no
        data.val_hr_dir) there is nothing to measure: the reduced precision is kept and the drop is recorded as None.
        Recorded in ``precision_check``."""
        if self.teacher is None or self.teacher_precision == "fp32":
            return
        gap = teacher_precision_gap(self.teacher, pairs, self.device, self.teacher_precision,
                                    self.config["model"]["scale"])
        self.precision_check = {"teacher_precision": self.teacher_precision, "teacher_psnr_drop_db": gap}
        if self.config["distill"]["teacher_precision"] == "auto" and gap is not None and gap > AUTO_MAX_LOSS_DB:
            self.teacher_precision = "fp32"
            self.precision_check["teacher_precision"] = "fp32"
        self.precision_check["teacher_precision_setting"] = self.config["distill"]["teacher_precision"]
        if self.teacher_precision != "fp32" and hasattr(self.teacher, "store_for_autocast"):
            self.teacher.store_for_autocast(DTYPES[self.teacher_precision])

    def wrap(self, distributed: bool, compile_networks: bool) -> None:
        """DDP around the trainable part (its gradients averaged over ranks), then torch.compile when asked."""
        if distributed:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.trainable, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if compile_networks:
            self.train_module = torch.compile(self.train_module)
            if self.teacher is not None:
                self.teacher = torch.compile(self.teacher)

    def teacher_forward(self, lr: Tensor) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """The frozen teacher's output and taps, without autograd, in ``teacher_precision``.

        Under ``torch.no_grad`` rather than ``inference_mode``: the fused FACD op saves the teacher's
        features for its backward, which inference tensors do not allow.
        """
        with torch.no_grad(), precision_context(self.device, self.teacher_precision):
            sr = self.teacher(lr)
            return sr, None if self.teacher_taps is None else self.teacher_taps.features()

    def losses(self, lr: Tensor, hr: Tensor, step: int):
        """One step's ``(loss, terms, parts)`` (see :class:`DistillationObjective`)."""
        distill, timer = self.config["distill"], self.timer
        self.train_module.train()
        if self.objective.needs_teacher and distill["lambda_warmup"] > 0:
            self.objective.feature_factor = min(1.0, (step + 1) / distill["lambda_warmup"])
        sr_teacher = teacher_features = None
        if self.teacher is not None:
            with timer("teacher"):
                sr_teacher, teacher_features = self.teacher_forward(lr)
        with autocast_for(self.device, self.config["train"]["amp"]):
            with timer("student"):
                sr, features, adapted = self.train_module(lr)
            loss, terms, parts = self.objective(sr, features, sr_teacher, teacher_features, hr,
                                                adapted_features=adapted, step=step, return_parts=True, timer=timer)
        if self.method in self.objective.terms:
            terms["lambda"] = torch.tensor(self.objective.weight(self.method), dtype=torch.float64)
        return loss, terms, parts

    def gradient_diagnostics(self, parts: Dict[str, Tensor]) -> Dict[str, float]:
        """Each group's gradient norm into the student and its cosine with the pixel group's, after the
        step's backward ran with ``retain_graph`` (:func:`facd_fast.train.diagnostics.term_gradient_norms`)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        return term_gradient_norms(parts, params, total=[p.grad for p in params])
