"""Uncertainty of the figures a report shows: Wilson score intervals for accuracies measured on few items."""

from __future__ import annotations

import math


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95%) of a proportion `correct / n`; (nan, nan) when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n correct, which
    matters for the 40-70 items per question type that a demo scores."""
    if n <= 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_text(accuracy: float | None, n: int | None, digits: int = 2) -> str:
    """'0.53 [0.40, 0.65] (n = 60)': an accuracy with its Wilson 95% interval; 'n/a' when unmeasured."""
    if accuracy is None or n is None or n <= 0 or not math.isfinite(accuracy):
        return "n/a (not measured)"
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"{accuracy:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n = {n})"
