"""Networks named by a preset or by a user's factory, ``"package.module:function"``.

``build_network(spec, scale, kwargs)`` is what the trainer, ``facd eval``,
``facd upscale`` and ``facd export`` call: a preset name (:data:`PRESETS`,
``kwargs`` overriding its constructor arguments) or an importable callable
called as ``factory(scale=scale, **kwargs)`` that returns an ``nn.Module``
mapping (B, 3, h, w) in [0, 1] to (B, 3, h*scale, w*scale). A network made by a
factory carries its record (``FACTORY_RECORD`` attribute: the factory name, the
keyword arguments and the scale), which exports store so that the network is
rebuilt from the same code later.
"""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Dict, Mapping, Optional

from torch import nn

from ..checks import check_scale
from .network import ResidualSRNetwork
from .presets import PRESETS, build

#: Attribute holding ``{"factory", "kwargs", "scale"}`` on a network a factory made (not in its state dict).
FACTORY_RECORD = "facd_record"


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` names a factory (``"package.module:function"``) rather than a preset."""
    return isinstance(spec, str) and ":" in spec


def import_factory(spec: str, what: str = "model") -> Callable[..., Any]:
    """The callable ``"package.module:attr.path"`` names; ValueError naming ``what`` and saying how to fix it."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what}: {spec!r} must look like \"package.module:function\"")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what}: cannot import module {module_name!r} of {spec!r} ({type(error).__name__}: "
                         f"{error}); install the package or add its folder to PYTHONPATH") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attribute!r} (in {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{what}: {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _json_kwargs(kwargs: Optional[Mapping[str, Any]], what: str) -> Dict[str, Any]:
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}_kwargs must hold plain values (numbers, strings, lists, tables): {error}") from None
    return kwargs


def build_network(spec: str, scale: int, kwargs: Optional[Mapping[str, Any]] = None, *, what: str = "model") -> nn.Module:
    """The network ``spec`` names at ``scale``: a preset (kwargs override its arguments) or ``factory(scale=, **kwargs)``.

    ``what`` names the setting in errors (``"model.student"``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{what} must name a preset or \"package.module:function\", got {spec!r}")
    kwargs = _json_kwargs(kwargs, what)
    if not is_factory_spec(spec):
        if spec not in PRESETS:
            raise ValueError(f"{what}: unknown preset {spec!r}; presets are {sorted(PRESETS)}, or name your own "
                             f"network as \"package.module:function\"")
        try:
            return build(spec, scale, **kwargs)
        except TypeError as error:
            raise ValueError(f"{what}_kwargs: {error}") from None
    factory = import_factory(spec, what)
    scale = check_scale("model.scale" if what.startswith("model.") else "scale", scale)
    try:
        network = factory(scale=scale, **kwargs)
    except TypeError as error:
        raise ValueError(f"{what}: {spec}(scale={scale}, **{kwargs}) failed: {error}") from None
    if not isinstance(network, nn.Module):
        raise ValueError(f"{what}: {spec} returned a {type(network).__name__}, not a torch.nn.Module")
    setattr(network, FACTORY_RECORD, {"factory": spec, "kwargs": kwargs, "scale": scale})
    return network


def factory_record(network: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"factory", "kwargs", "scale"}`` of a network a factory made, else None."""
    record = getattr(network, FACTORY_RECORD, None)
    return record if isinstance(record, dict) else None


def network_scale(network: nn.Module) -> int:
    """The upscaling factor of a preset network or of one a factory made."""
    if isinstance(network, ResidualSRNetwork):
        return network.scale
    record = factory_record(network)
    if record is None:
        raise ValueError(f"{type(network).__name__} records no scale: build it with facd_fast.models.build_network")
    return record["scale"]


def default_taps(network: nn.Module) -> Optional[tuple]:
    """A preset's feature taps (module names, docs/models.md, "Feature taps"), or None for other networks."""
    return tuple(network.taps) if isinstance(network, ResidualSRNetwork) else None
