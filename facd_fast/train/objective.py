"""The training objective of docs/loss.md, "The training objective": a weighted sum of named terms (:mod:`facd_fast.train.terms`).

    L = (1 - alpha) * pixel + alpha * output + lambda * <the method's feature term> [+ sum_k v_k * extra_k]

``distill.method`` is the shorthand for the first three: "none" is the pixel
term alone; "fd-l1", "fd-l2", "fakd", "facd" and "facd-nomask" name the
feature term (which sums its taps with ``distill.tap_weights``).
``distill.terms`` adds terms, or changes a term's weight (0 removes it), by
name: a registered term, or ``"package.module:attr"`` whose import registers it.
The adaptive mask, when the run uses it, gates every maskable term (the output
and feature terms; "facd-nomask" is never gated).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, ContextManager, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import api
from ..definition import mask_from_mse, psnr_gap
from .config import ConfigError, method_distance
from .terms import GROUPS, TERMS, TermInputs, TermSettings, masked_mean

#: The log's name for a term's unweighted value (the method's own feature term logs as "feature").
LOG_KEYS = {"pixel": "l1_hr", "output": "l1_teacher"}


def mask_enabled(method: str, use_mask) -> bool:
    """Resolve ``distill.use_mask`` ("auto", True, False) for ``method``."""
    if method in ("none", "facd-nomask"):
        return False
    if use_mask == "auto":
        return method == "facd"
    return bool(use_mask)


def method_weights(method: str, alpha: float, feature_weight: float) -> Dict[str, float]:
    """The terms ``distill.method`` stands for, with their weights (in the order they are summed)."""
    if method == "none":
        return {"pixel": 1.0}
    return {"pixel": 1.0 - alpha, "output": alpha, method: feature_weight}


def term_class(name: str) -> type:
    """The registered term ``name``; ``"package.module:attr"`` is imported first (its import registers it)."""
    if name in TERMS:
        return TERMS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"distill.terms: cannot import {module_name!r} for the term {name!r} "
                              f"({type(error).__name__}: {error})") from None
        target = getattr(module, attribute, None)
        for registered in TERMS.values():
            if getattr(registered, "registered_from", None) is target:
                return registered
        raise ConfigError(f"distill.terms: {name!r} is not a registered loss term; decorate it with "
                          f"@facd_fast.train.register_term(\"{attribute}\")")
    raise ConfigError(f"distill.terms: unknown loss term {name!r}; registered terms are {sorted(TERMS)}, or name "
                      f"one as \"package.module:function\"")


def _no_timer(name: str) -> ContextManager:
    return contextlib.nullcontext()


class DistillationObjective(nn.Module):
    """The loss of one training step: the weighted sum of the terms the method and ``terms`` select.

    Args:
        method: one of :data:`facd_fast.train.config.METHODS`.
        alpha, feature_weight: alpha and lambda of the objective (unused for "none").
        tap_weights: w_j, one per tap.
        use_mask: gate the maskable terms per patch by the adaptive mask.
        margin_db, normalize, backend: FACD's options (docs/loss.md); normalize applies to FD too.
        distance: ``distill.distance`` ("auto", "l1", "l2"), resolved by
            :func:`facd_fast.train.config.method_distance` (fd-l1/fd-l2 fix theirs).
        terms: ``distill.terms``, {term name: weight} added to the method's terms (0 removes one).

    forward(sr_student, student_features, sr_teacher, teacher_features, hr, *, adapted_features=None):
        sr_*, hr: (B, 3, H, W) float; features: lists of (B, C_j, h, w); adapted_features: the
        student's through DR (default: student_features, e.g. already adapted); the teacher
        arguments may be None when no term needs them. Returns ``(loss, terms)``, or
        ``(loss, terms, parts)`` with ``return_parts``: loss a float32 scalar, terms detached
        scalars for the log, parts the weighted sum of each group ("pixel", "output",
        "feature") still in the graph, for the gradient diagnostics.
    """

    def __init__(
        self,
        method: str,
        *,
        alpha: float = 0.5,
        feature_weight: float = 1.0,
        tap_weights=(1.0, 1.0, 1.0),
        use_mask: bool = True,
        margin_db: float = 0.0,
        distance: str = "auto",
        normalize: str = "channel",
        backend: str = "auto",
        terms: Optional[Mapping[str, float]] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {alpha}")
        if feature_weight < 0:
            raise ValueError(f"distill.lambda must be >= 0, got {feature_weight}")
        self.method = method
        self.distance = method_distance(method, distance)  # raises for an unknown method or a contradiction
        self.use_mask = use_mask
        self.margin_db = margin_db
        self.backend = backend
        self.tap_weights = tuple(float(w) for w in tap_weights)
        weights = method_weights(method, float(alpha), float(feature_weight))
        for name, weight in (terms or {}).items():
            weights[name] = float(weight)
        settings = TermSettings(self.tap_weights, self.distance or "l1", normalize, margin_db, backend)
        self.terms = nn.ModuleDict()
        self.weights: Dict[str, float] = {}
        self.log_keys: Dict[str, str] = {}
        for name, weight in weights.items():
            if weight == 0.0:
                continue  # a term of weight 0 would only cost time
            term = term_class(name)(settings)
            self.terms[term.name] = term
            self.weights[term.name] = weight
            self.log_keys[term.name] = LOG_KEYS.get(term.name, "feature" if name == method else term.name)
        if not self.terms:
            raise ConfigError(f"distill: every term of method {method!r} has weight 0 (distill.alpha, distill.lambda, "
                              "distill.terms): give one a weight > 0")
        self.feature_factor = 1.0  # distill.lambda_warmup's ramp, set by the trainer before each step
        self.facd = next((t.facd for t in self.terms.values() if hasattr(t, "facd")), None)

    def _any(self, flag: str) -> bool:
        return any(getattr(term, flag) for term in self.terms.values())

    @property
    def needs_teacher(self) -> bool:
        return self._any("needs_teacher")

    @property
    def needs_features(self) -> bool:
        return self._any("needs_features")

    @property
    def adapted(self) -> bool:
        """Whether a term compares DR-adapted student features with the teacher's."""
        return self._any("adapted")

    @property
    def computes_mask(self) -> bool:
        return (self.use_mask and any(t.maskable and t.needs_teacher for t in self.terms.values())) or self._any("wants_mask")

    def weight(self, name: str) -> float:
        """The weight of term ``name`` at this step (feature terms ramped by ``feature_factor``)."""
        weight = self.weights[name]
        return weight * self.feature_factor if self.terms[name].group == "feature" else weight

    def forward(
        self,
        sr_student: Tensor,
        student_features: Optional[List[Tensor]],
        sr_teacher: Optional[Tensor],
        teacher_features: Optional[List[Tensor]],
        hr: Tensor,
        *,
        adapted_features: Optional[List[Tensor]] = None,
        step: int = 0,
        return_parts: bool = False,
        timer: Callable[[str], ContextManager] = _no_timer,
    ):
        adapted_features = student_features if adapted_features is None else adapted_features
        for features, label in ((student_features, "student"), (teacher_features, "teacher")):
            if self.needs_features and features is not None and len(features) != len(self.tap_weights):
                raise ValueError(f"distill.tap_weights has {len(self.tap_weights)} weights but the {label} "
                                 f"gives {len(features)} taps")
        inputs = TermInputs(sr_student.float(), hr.float(), step=step)
        terms: Dict[str, Tensor] = {}
        mask = None
        if self.needs_teacher:
            inputs.sr_teacher = sr_teacher.float()
            if self.needs_features:
                inputs.student_features, inputs.adapted_features = student_features, adapted_features
                inputs.teacher_features = [t.to(s.dtype) for s, t in zip(adapted_features, teacher_features)]
            if self.computes_mask:
                with timer("mask"), torch.no_grad():
                    mse = api.patch_mse(inputs.sr_student.detach(), inputs.sr_teacher, inputs.hr, backend=self.backend)
                    mask = mask_from_mse(mse, self.margin_db)
                terms["psnr_gap_db"] = psnr_gap(mse).mean().float()
        parts: Dict[str, Tensor] = {}
        for name, term in self.terms.items():
            gate = mask if self.use_mask and term.maskable else None
            with timer(f"term:{name}"):
                inputs.mask = gate
                value = term(inputs)
                if value.dim() == 1:
                    value = masked_mean(value, gate)
                part = self.weight(name) * value.float()
            parts[term.group] = part if term.group not in parts else parts[term.group] + part
            terms[self.log_keys[name]] = value.detach().float()
        groups = [parts[group] for group in GROUPS if group in parts]
        loss = groups[0]
        for part in groups[1:]:
            loss = loss + part
        terms["loss"] = loss.detach()
        if self.needs_teacher:
            terms["distilled_fraction"] = (mask.float().mean() if mask is not None and self.use_mask
                                           else torch.ones((), device=hr.device))
        return (loss, terms, parts) if return_parts else (loss, terms)
