"""The statistics of ``facd study``: mean, standard deviation, t-based 95% confidence intervals, paired differences.

No SciPy: the two-sided Student-t quantile is found by bisection on the
closed-form t distribution for integer degrees of freedom (Abramowitz and
Stegun 26.7.3-4), exact to 1e-12.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence


def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's T with ``df`` (integer >= 1) degrees of freedom, t >= 0."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = c, c
        for k in range(3, df - 1, 2):  # cos^(k) terms: 2.4...(k-1) / 1.3...k
            term *= c * c * (k - 1) / k
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # cos^(k) terms: 1.3...(k-1) / 2.4...k
        term *= c * c * (k - 1) / k
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = ``confidence`` (e.g. 0.95 -> 2.776 for df = 4)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    low, high = 0.0, 1.0
    while _t_central_probability(high, df) < confidence:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Dict[str, float]:
    """n, mean, std (n - 1 in the denominator) and the t-based confidence interval of the mean.

    With one value, std and the interval are NaN (unknown), never 0.
    """
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        std = half = float("nan")
    else:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "ci_half": half}


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95, tie: float = 0.0
) -> Optional[Dict[str, float]]:
    """Statistics of a[seed] - b[seed] over the seeds both have (None when they share none).

    Adds to :func:`summarize`'s keys: ``wins`` (a above b by more than ``tie``),
    ``losses`` (below by more than ``tie``), ``ties`` and ``seeds``.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    result = summarize(differences, confidence)
    result.update(
        wins=sum(d > tie for d in differences),
        losses=sum(d < -tie for d in differences),
        ties=sum(abs(d) <= tie for d in differences),
        seeds=seeds,
    )
    return result


def verdict(stats: Mapping[str, float]) -> str:
    """In words: whether a confidence interval of a difference lies above zero, below it or contains it."""
    if math.isnan(stats["ci_half"]):
        return "one seed: no interval"
    if stats["ci_low"] > 0:
        return "better (CI above 0)"
    if stats["ci_high"] < 0:
        return "worse (CI below 0)"
    return "inside the noise (CI contains 0)"
