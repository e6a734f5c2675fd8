"""Argument checks shared by every layer: TypeError for a value of the wrong type, ValueError for a wrong value.

``name`` is how the error names the argument (``"eps"``, ``"train.lr"``,
``"--tile"``). A bool is never a number here, nor is a tensor: ``True`` for a
count or ``torch.tensor(0.1)`` for a weight is a mistake the check names.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional

#: What model.scale and the networks support.
SUPPORTED_SCALES = "powers of two and 3"


def _range_text(least, greatest, least_inclusive: bool = True, greatest_inclusive: bool = True) -> str:
    if greatest is None:
        return f"{'>=' if least_inclusive else '>'} {least}"
    if least is None:
        return f"{'<=' if greatest_inclusive else '<'} {greatest}"
    return (f"in {'[' if least_inclusive else '('}{least}, {greatest}{']' if greatest_inclusive else ')'}")


def _check_range(name: str, value, least, greatest, least_inclusive: bool, greatest_inclusive: bool) -> None:
    below = least is not None and (value < least or (value == least and not least_inclusive))
    above = greatest is not None and (value > greatest or (value == greatest and not greatest_inclusive))
    if below or above:
        raise ValueError(f"{name} must be {_range_text(least, greatest, least_inclusive, greatest_inclusive)}, "
                         f"got {value!r}")


def check_int(name: str, value: Any, least: Optional[int] = None, greatest: Optional[int] = None) -> int:
    """``value`` as an int in [least, greatest] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    _check_range(name, value, least, greatest, True, True)
    return int(value)


def check_real(name: str, value: Any, least: Optional[float] = None, greatest: Optional[float] = None, *,
               least_inclusive: bool = True, greatest_inclusive: bool = True) -> float:
    """``value`` as a finite float within the bounds (either may be None; each inclusive unless said otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    _check_range(name, value, least, greatest, least_inclusive, greatest_inclusive)
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    """``value`` if it is one of ``choices`` (compared by type too: True is not 1)."""
    choices = list(choices)
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_scale(name: str, value: Any) -> int:
    """An upscaling factor the networks support: 2, 3, 4, 8, ..."""
    scale = check_int(name, value)
    if scale < 2 or (scale != 3 and scale & (scale - 1)):
        raise ValueError(f"{name} must be one of {SUPPORTED_SCALES} (2, 3, 4, 8, ...), got {scale}")
    return scale
