"""``FeatureTaps``: the outputs of named submodules of any network, recorded by forward hooks.

A tap is named as ``model.named_modules()`` names the module (``"body.3"``,
``"layers.0.residual_group"``), so any network is distilled without editing
it, as torchdistill's ``ForwardHookManager`` does for classifiers::

    taps = FeatureTaps(student, ["body.1", "body.3", "conv_after_body"])
    sr = student(lr)
    features = taps.features()        # [(B, C, h, w), ...], in the order of the names

Where hooks work: in eager mode; under ``DistributedDataParallel`` (give the
bare network or the DDP wrapper: the wrapper's ``module.`` prefix is not part
of the names); under ``torch.compile`` when the taps are made before the
network is compiled (Dynamo traces the hooks into the graph; hooks added to an
already compiled network are not seen until it recompiles). A tapped module
must return a tensor; a module called twice in one forward keeps its last output;
each forward of the network starts the record afresh.
"""
from __future__ import annotations

import difflib
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn


def bare_network(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel and torch.compile wrappers.

    Only those wrappers are opened: a submodule of the user's own network named ``module`` or ``_orig_mod`` is
    part of the network.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule  # imported only for a model that may be one

    return isinstance(model, OptimizedModule)


def check_tap_names(model: nn.Module, names: Sequence[str], what: str = "taps") -> List[str]:
    """``names`` as a list, checked against ``model.named_modules()``: ValueError naming an unknown one and the nearest valid names.

    ``what`` names the setting in errors (``"model.student_taps"``).
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a list of module names, got {type(names).__name__} {names!r}")
    names = list(names)
    if not names:
        raise ValueError(f"{what} must name at least one module, got an empty list")
    modules = dict(bare_network(model).named_modules())
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must hold module names (str), got {type(name).__name__} {name!r}")
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            nearest = difflib.get_close_matches(name, valid, n=5, cutoff=0.5) or valid[:5]
            raise ValueError(f"{what}: {type(bare_network(model)).__name__} has no module named {name!r}; "
                             f"nearest: {', '.join(nearest)} ({len(valid)} modules; list them with "
                             f"[n for n, _ in model.named_modules()])")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{what} names {', '.join(repeated)} more than once")
    return names


class FeatureTaps:
    """Records the outputs of the submodules ``names`` of ``model`` at every forward.

    Args:
        model: any ``nn.Module`` (or a DDP / torch.compile wrapper of one).
        names: module names as ``model.named_modules()`` gives them; an
            unknown name is a ValueError naming it and the nearest valid names.

    :meth:`features` returns the outputs of the last forward, in the order of
    ``names``; :meth:`remove` (or leaving a ``with`` block) takes the hooks off.
    The outputs stay in the autograd graph: a student's features carry
    gradients, a teacher run under ``torch.no_grad()`` gives constants.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = tuple(check_tap_names(model, names))
        network = bare_network(model)
        modules = dict(network.named_modules())
        self._outputs: Dict[str, Tensor] = {}
        self._versions: Dict[str, int] = {}
        # Each forward starts empty, so a tap that did not run is an error, not the last forward's value.
        self._handles = [network.register_forward_pre_hook(lambda module, args: self.clear())]
        self._handles += [modules[name].register_forward_hook(self._recorder(name)) for name in self.names]

    def _recorder(self, name: str):
        def record(module: nn.Module, args, output) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"tap {name!r}: {type(module).__name__} returned {type(output).__name__}, "
                                f"not a tensor; tap a module that returns one")
            self._outputs[name] = output
            if not torch.compiler.is_compiling() and not output.is_inference():
                self._versions[name] = output._version
        return record

    def features(self) -> List[Tensor]:
        """The tapped outputs of the last forward, one per name, in the order of the names."""
        missing = [name for name in self.names if name not in self._outputs]
        if missing:
            raise RuntimeError(f"taps {missing} recorded nothing: run the network's forward first "
                               f"(or these modules are not used in its forward)")
        if not torch.compiler.is_compiling():
            for name, version in self._versions.items():
                # A later in-place op (x += ..., ReLU(inplace=True)) would change the recorded values silently.
                if self._outputs[name]._version != version:
                    raise RuntimeError(f"tap {name!r}: its output was modified in place later in the forward; "
                                       f"tap the module after the in-place operation instead")
        return [self._outputs[name] for name in self.names]

    def clear(self) -> None:
        """Drop the recorded outputs (and the memory they hold)."""
        self._outputs.clear()
        self._versions.clear()

    def remove(self) -> None:
        """Take the hooks off the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps({list(self.names)})"
