"""Statistics shared by reports: finite numbers, mean / standard deviation over seeds, and paired bootstrap
intervals with the verdicts they decide."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np


def finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (None and strings are not)."""
    return isinstance(x, int | float) and math.isfinite(x)


def mean_std(xs: list[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the finite values (NaN if none; std 0 for one value)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


# --- intervals ------------------------------------------------------------------------------------------------------
#
# The arena's effects are means over test problems (0/1 outcomes) and seeds. Their intervals come from a paired
# bootstrap that resamples both: seeds with replacement and, independently, problems with replacement, the same
# problem indices for every seed and every arm being compared (the test problems are shared, so the arms are
# paired). With one seed only the problems are resampled.

BOOTSTRAP_REPLICATES = 2000


def outcomes(s: str | None) -> np.ndarray | None:
    """Per-problem outcomes stored as a string of 0/1 (``TaskEval.outcomes``) as a float array; None if absent."""
    return None if not s else np.frombuffer(s.encode(), dtype=np.uint8).astype(np.float64) - ord("0")
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An effect with its 95% bootstrap interval and the number of (seed, problem) outcomes behind it."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}

    def excludes(self, value: float = 0.0) -> bool:
        return self.ci_low > value or self.ci_high < value

    def format(self, digits: int = 2) -> str:
        if not finite(self.mean):
            return "n/a"
        return f"{self.mean:+.{digits}f} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}] (n={self.n})"


@dataclass(frozen=True)
class Ratio:
    """A ratio of means over one shared denominator, with its bootstrap interval. ``unstable`` when the
    denominator's own interval reaches below ``floor``: the ratio is then not reported as a number."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    denominator: Interval
    unstable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"mean": None if self.unstable else self.mean, "ci_low": None if self.unstable else self.ci_low,
                "ci_high": None if self.unstable else self.ci_high, "n": self.n, "unstable": self.unstable,
                "denominator": self.denominator.as_dict()}

    def format(self, digits: int = 2) -> str:
        if self.unstable:
            return f"unstable (denominator {self.denominator.format(digits)})"
        return f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] (n={self.n})"


def _as_matrix(x: Any) -> np.ndarray:
    """Outcomes as [seeds, problems], or [seeds, settings, problems] (several settings averaged into one effect,
    e.g. every defended setting: their problems are the same test problems, resampled together)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"expected outcomes as [seeds, problems] or [seeds, settings, problems], got {a.shape}")
    return a


def _resample(shape: tuple[int, ...], replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, p = shape[0], shape[-1]
    seeds = rng.integers(0, s, size=(replicates, s)) if s > 1 else np.zeros((replicates, 1), dtype=np.int64)
    probs = rng.integers(0, p, size=(replicates, p))
    return seeds, probs


def _replicate_means(a: np.ndarray, seeds: np.ndarray, probs: np.ndarray) -> np.ndarray:
    # mean over the resampled seeds of the mean over the resampled problems (same problems for every seed)
    return np.stack([a[s][..., q].mean() for s, q in zip(seeds, probs, strict=True)])


def bootstrap_mean(x: Any, *, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> Interval:
    """Mean of ``x`` ([seeds, problems], [problems] or [seeds, settings, problems]) with a 95% interval
    (percentile bootstrap)."""
    a = _as_matrix(x)
    seeds, probs = _resample(a.shape, replicates, seed)
    reps = _replicate_means(a, seeds, probs)
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(a.mean()), float(lo), float(hi), int(a.size))


def paired_difference(x: Any, y: Any, *, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> Interval:
    """``mean(x) - mean(y)`` for outcomes paired by seed and problem (same shape), with a 95% interval."""
    a, b = _as_matrix(x), _as_matrix(y)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, replicates=replicates, seed=seed)


def paired_ratio(num: Any, den: Any, *, floor: float = 0.05, replicates: int = BOOTSTRAP_REPLICATES,
                 seed: int = 0) -> Ratio:
    """``mean(num) / mean(den)`` (a ratio of means: one shared denominator, not a mean of per-seed ratios) for
    paired outcomes, with a 95% interval from the same resamples for both; ``unstable`` when the denominator's
    interval reaches below ``floor``."""
    a, b = _as_matrix(num), _as_matrix(den)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    seeds, probs = _resample(a.shape, replicates, seed)
    ra, rb = _replicate_means(a, seeds, probs), _replicate_means(b, seeds, probs)
    q = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]
    dlo, dhi = np.quantile(rb, q)
    denominator = Interval(float(b.mean()), float(dlo), float(dhi), int(b.size))
    unstable = not denominator.ci_low >= floor
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ra / rb
    mean = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    lo, hi = (np.quantile(ratios[np.isfinite(ratios)], q) if np.isfinite(ratios).any() else (np.nan, np.nan))
    return Ratio(mean, float(lo), float(hi), int(a.size), denominator, unstable)


Verdict = str  # "yes", "no" or "inconclusive"


def verdict(effect: Interval, *, yes_when: str = "positive", margin: float = 0.0) -> Verdict:
    """``yes`` / ``no`` when the interval lies wholly on one side of ``margin``, else ``inconclusive``.
    ``yes_when`` says which side answers the question with yes (``positive``: above the margin)."""
    if not (finite(effect.ci_low) and finite(effect.ci_high)):
        return "inconclusive"
    above, below = effect.ci_low > margin, effect.ci_high < margin
    if not (above or below):
        return "inconclusive"
    return "yes" if above == (yes_when == "positive") else "no"
