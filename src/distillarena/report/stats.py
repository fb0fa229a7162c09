"""Small statistics shared by reports: finite numbers and mean / standard deviation over seeds."""

from __future__ import annotations

import math
import statistics
from typing import Any


def finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (None and strings are not)."""
    return isinstance(x, int | float) and math.isfinite(x)


def mean_std(xs: list[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values (NaN if none; std 0 for one value)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)
