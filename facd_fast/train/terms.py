"""The objective's terms, each registered by name, as BasicSR registers its losses (``LOSS_REGISTRY``).

A term is a small ``nn.Module`` (:class:`LossTerm`) that takes the step's
tensors (:class:`TermInputs`) and returns a scalar, or a (B,) per-patch
value that the objective reduces (``sum_i m_i x_i / B`` under the adaptive
mask, else the mean). The objective is the weighted sum of the terms a run
selects (:mod:`facd_fast.train.objective`). Built in:

=============== ======== ==================================================================
name            group    what it compares
=============== ======== ==================================================================
``pixel``       pixel    L1(sr_s, hr)
``output``      output   L1(sr_s, sr_t) per patch (masked output distillation)
``fd-l1/-l2``   feature  FitNet-style FD between DR(s_j) and t_j, summed over taps with w_j
``fakd``        feature  FAKD's spatial-affinity L1 between s_j and t_j
``facd``        feature  FACD: the contrastive loss, masked (:class:`facd_fast.FACDLoss`)
``facd-nomask`` feature  FACD without the mask
=============== ======== ==================================================================

A user adds a term with one decorator, then selects it with its weight in a
config (``[distill] terms = {edge = 0.1}``, or ``{"mypkg.losses:edge" = 0.1}``
to have the trainer import the module that registers it)::

    from facd_fast.train import register_term

    @register_term("edge", needs_teacher=True)
    def edge(inputs):                     # inputs: TermInputs
        grad = lambda x: x[..., 1:] - x[..., :-1]
        return (grad(inputs.sr_student) - grad(inputs.sr_teacher)).abs().flatten(1).mean(1)   # (B,)

The group ("pixel": towards the ground truth, "output": towards the teacher's
output, "feature": towards the teacher's features) is what ``distill.lambda_warmup``
ramps (feature terms) and what the gradient diagnostics sum by.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Type

import torch.nn.functional as F
from torch import Tensor, nn

from ..module import FACDLoss
from .feature_losses import affinity_distance, feature_distance, per_patch_l1

GROUPS = ("pixel", "output", "feature")


@dataclass
class TermInputs:
    """What one step gives its terms.

    sr_student, hr: (B, 3, H, W) float32. sr_teacher: the same, or None when
    no term needs the teacher. student_features: the student's taps
    (B, C_s, h_j, w_j); adapted_features: the same through the DR adapters
    (B, C_t, h_j, w_j), or None when no term uses adapters; teacher_features:
    the teacher's taps (B, C_t, h_j, w_j), in the adapted features' dtype.
    mask: (B,) bool, the adaptive mask for a term it gates, else None.
    step: the step being taken (0-based).
    """

    sr_student: Tensor
    hr: Tensor
    sr_teacher: Optional[Tensor] = None
    student_features: Optional[List[Tensor]] = None
    adapted_features: Optional[List[Tensor]] = None
    teacher_features: Optional[List[Tensor]] = None
    mask: Optional[Tensor] = None
    step: int = 0


@dataclass(frozen=True)
class TermSettings:
    """The ``distill`` settings a term is built with."""

    tap_weights: Sequence[float] = (1.0, 1.0, 1.0)
    distance: str = "l1"
    normalize: str = "channel"
    margin_db: float = 0.0
    backend: str = "auto"


class LossTerm(nn.Module):
    """One named term of the objective; subclasses (or :func:`register_term` on a function) set:

    group: "pixel", "output" or "feature"; needs_teacher: it reads the teacher's
    output or features; needs_features: it reads the taps; adapted: it compares
    the DR-adapted student features with the teacher's (sizing the adapters);
    maskable: the adaptive mask gates it when the run's mask is on;
    wants_mask: the run computes the mask (and its PSNR gap) even when it gates nothing;
    distance: the feature distance its name fixes ("l1", "l2"), or None; takes_distance:
    it uses ``distill.distance`` instead ("auto" meaning "l1").

    forward(inputs: TermInputs) -> scalar, or (B,) per patch (reduced by the objective).
    """

    name = ""
    group = "feature"
    needs_teacher = True
    needs_features = False
    adapted = False
    maskable = True
    wants_mask = False
    distance: Optional[str] = None
    takes_distance = False

    def __init__(self, settings: TermSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(self, inputs: TermInputs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, group={self.group!r}"


#: name -> term class; :func:`register_term` adds to it.
TERMS: Dict[str, Type[LossTerm]] = {}
_FLAGS = ("needs_teacher", "needs_features", "adapted", "maskable", "wants_mask", "takes_distance")


def register_term(name: str, *, group: Optional[str] = None, **flags: bool) -> Callable:
    """Register a :class:`LossTerm` subclass, or a function ``inputs -> Tensor``, as the term ``name``.

    ``group`` and the flags (``needs_teacher``, ``needs_features``, ``adapted``,
    ``maskable``, ``wants_mask``) set the attributes of :class:`LossTerm`; a
    function term defaults to group "feature", needing the teacher, maskable.
    Returns the decorated object unchanged.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a term name must be a non-empty string without ':', got {name!r}")
    unknown = sorted(set(flags) - set(_FLAGS))
    if unknown:
        raise TypeError(f"register_term got unknown flags {unknown}; flags are {list(_FLAGS)}")
    if group is not None and group not in GROUPS:
        raise ValueError(f"register_term({name!r}): group must be one of {list(GROUPS)}, got {group!r}")

    def decorate(target):
        if name in TERMS:
            raise ValueError(f"a loss term named {name!r} is already registered ({TERMS[name].__qualname__})")
        if isinstance(target, type) and issubclass(target, LossTerm):
            term_class = target
        elif callable(target):
            term_class = type(f"{type(target).__name__}Term_{name}", (LossTerm,),
                              {"forward": lambda self, inputs: target(inputs), "__doc__": target.__doc__,
                               "__module__": getattr(target, "__module__", __name__)})
        else:
            raise TypeError(f"register_term({name!r}) decorates a LossTerm subclass or a function, "
                            f"got {type(target).__name__}")
        term_class.name = name
        term_class.registered_from = target  # what a "package.module:attr" config entry finds it by
        if group is not None:
            term_class.group = group
        for flag, value in flags.items():
            setattr(term_class, flag, bool(value))
        TERMS[name] = term_class
        return target

    return decorate


def masked_mean(per_patch: Tensor, mask: Optional[Tensor]) -> Tensor:
    """sum_i m_i * x_i / B (the FACD reduction), or the plain mean without a mask."""
    if mask is None:
        return per_patch.mean()
    return (per_patch * mask.to(per_patch.dtype)).sum() / per_patch.shape[0]


@register_term("pixel", group="pixel", needs_teacher=False, maskable=False)
class PixelL1(LossTerm):
    """L1(sr_s, hr) over the batch."""

    def forward(self, inputs: TermInputs) -> Tensor:
        return F.l1_loss(inputs.sr_student, inputs.hr)


@register_term("output", group="output")
class OutputL1(LossTerm):
    """Per-patch L1(sr_s, sr_t), (B,)."""

    def forward(self, inputs: TermInputs) -> Tensor:
        return per_patch_l1(inputs.sr_student, inputs.sr_teacher)


class _TapSum(LossTerm):
    """sum_j w_j * (masked mean of a per-patch distance at tap j)."""

    needs_features = True

    def per_patch(self, student: Tensor, teacher: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, inputs: TermInputs) -> Tensor:
        students = inputs.adapted_features if self.adapted else inputs.student_features
        total = 0.0
        for weight, s, t in zip(self.settings.tap_weights, students, inputs.teacher_features):
            total = total + weight * masked_mean(self.per_patch(s, t), inputs.mask)
        return total


class _FeatureDistance(_TapSum):
    adapted = True

    def per_patch(self, student: Tensor, teacher: Tensor) -> Tensor:
        return feature_distance(student, teacher, self.distance, self.settings.normalize)


@register_term("fd-l1")
class FeatureDistanceL1(_FeatureDistance):
    """FitNet-style FD, mean |phi(DR(s_j)) - phi(t_j)| per patch."""

    distance = "l1"


@register_term("fd-l2")
class FeatureDistanceL2(_FeatureDistance):
    """FitNet-style FD, mean (phi(DR(s_j)) - phi(t_j))^2 per patch."""

    distance = "l2"


@register_term("fakd")
class FeatureAffinity(_TapSum):
    """FAKD: mean |A(s_j) - A(t_j)| of the spatial affinity matrices (no DR adapter)."""

    def per_patch(self, student: Tensor, teacher: Tensor) -> Tensor:
        return affinity_distance(student, teacher)


@register_term("facd", adapted=True, needs_features=True, wants_mask=True, takes_distance=True)
class ContrastiveDistillation(LossTerm):
    """FACD: sum_j w_j contrastive_loss(DR(s_j), t_j, mask) (:class:`facd_fast.FACDLoss`)."""

    def __init__(self, settings: TermSettings) -> None:
        super().__init__(settings)
        self.facd = FACDLoss(settings.tap_weights, use_mask=self.maskable, margin_db=settings.margin_db,
                             distance=settings.distance, normalize=settings.normalize, backend=settings.backend)

    def forward(self, inputs: TermInputs) -> Tensor:
        return self.facd.weighted_sum(inputs.adapted_features, inputs.teacher_features, inputs.mask)


@register_term("facd-nomask", maskable=False)
class ContrastiveDistillationNoMask(ContrastiveDistillation):
    """FACD on every patch (the mask is still computed, for the log's PSNR gap)."""
