"""The grid of a study: its runs (method x seed x sweep point), the sweeps and the overrides of each run.

Sweep keys of the ``distill`` section do not change a ``none`` run (the student
alone has no distillation term), so the ``none`` runs are shared by every
sweep point that differs only there.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import METHODS, ConfigError, load_config


def split_values(text: str) -> List[str]:
    """``"0.01,0.1"`` -> ["0.01", "0.1"]; commas inside brackets or quotes do not split (``[1,0,0],[0,0,1]``)."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    if any(not v for v in values):
        raise ConfigError(f"--sweep values {text!r}: an empty value (check the commas)")
    return values


def parse_sweep(text: str) -> Tuple[str, List[str]]:
    """``"distill.lambda=0.01,0.1"`` -> ("distill.lambda", ["0.01", "0.1"]), each value checked against the config keys."""
    if "=" not in text:
        raise ConfigError(f"--sweep {text!r} must look like section.key=value1,value2,...")
    key, raw = text.split("=", 1)
    key = key.strip()
    values = split_values(raw)
    for value in values:
        load_config(None, [f"{key}={value}"])  # a typo in the key or a wrong-typed value fails here
    if key in ("distill.method", "run.seed", "run.out_dir"):
        raise ConfigError(f"--sweep {key}: use --methods / --seeds / --out for that")
    return key, values


@dataclass
class Run:
    """One training run of the grid."""

    method: str
    seed: int
    point: Dict[str, str]  # the sweep values that apply to this method
    overrides: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = [self.method] + [f"{k}={v}" for k, v in self.point.items()]
        return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "__".join(parts))

    def relative_dir(self) -> Path:
        return Path("runs") / self.name / f"seed{self.seed}"


def sweep_points(sweeps: Sequence[Tuple[str, List[str]]]) -> List[Dict[str, str]]:
    """Every combination of the sweep values (one empty point without sweeps)."""
    keys = [key for key, _ in sweeps]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[values for _, values in sweeps])]


def applies(method: str, key: str) -> bool:
    """Whether a config key can change a run of ``method`` (the distill section does not change "none")."""
    return not (method == "none" and key.startswith("distill."))


def split_method_set(text: str) -> Tuple[Optional[str], str]:
    """``"facd:distill.lambda=0.03"`` -> ("facd", "distill.lambda=0.03"); a plain override -> (None, text)."""
    match = re.fullmatch(r"([a-z0-9-]+):(.+)", text)
    if match and match.group(1) in METHODS:
        return match.group(1), match.group(2)
    return None, text


def check_grid_arguments(methods: Sequence[str], seeds: Sequence[int], baseline: str, sets: Sequence[str]) -> None:
    """ConfigError naming the argument: an unknown or repeated method, a repeated seed, a baseline that is
    not studied, a ``--set`` for a method that is not studied or with a bad key or value."""
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--methods: unknown method {method!r}; methods are {list(METHODS)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ConfigError("--methods and --seeds must not repeat a value")
    if baseline not in methods:
        raise ConfigError(f"--baseline {baseline!r} is not one of --methods {list(methods)}")
    for text in sets:
        prefix, override = split_method_set(text)
        if prefix is not None and prefix not in methods:
            raise ConfigError(f"--set {text!r}: method {prefix!r} is not one of --methods {list(methods)}")
        load_config(None, [override])  # a typo in the key or a wrong-typed value fails here


def build_grid(methods: Sequence[str], seeds: Sequence[int], sweeps: Sequence[Tuple[str, List[str]]],
               sets: Sequence[str] = ()) -> List[Run]:
    """The runs, without duplicates (a "none" run serves every point differing only in distill keys).

    ``sets`` are overrides for every run, or for one method's runs when prefixed ``METHOD:``
    (``facd:distill.lambda=0.03``).
    """
    runs: Dict[Tuple, Run] = {}
    for point in sweep_points(sweeps):
        for method in methods:
            own = {k: v for k, v in point.items() if applies(method, k)}
            own_sets = [text for prefix, text in map(split_method_set, sets) if prefix in (None, method)]
            for seed in seeds:
                overrides = [*own_sets, *(f"{k}={v}" for k, v in own.items()), f"distill.method={method}", f"run.seed={seed}"]
                key = (method, seed, tuple(own.items()))
                runs.setdefault(key, Run(method, seed, own, overrides))
    return list(runs.values())


def point_label(point: Dict[str, str]) -> str:
    """``{"distill.lambda": "0.1"}`` -> "lambda=0.1"; "-" for the empty point."""
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "-"
