"""The attacker's side of the distillation game: per-trace value (central finite difference along the student's
holdout gradient), weights (exponential tilting, normalised to mean 1), top-q filtering, and an oracle value
(the actual holdout-loss change after one step on a trace) to check the cheap estimate against."""

from distillarena.attacks.lm import oracle_traces, per_sequence_nll, value_traces
from distillarena.attacks.valuation import (
    Valuation,
    fd_values,
    holdout_direction,
    oracle_values,
    ranks,
    spearman,
    standardize,
    top_fraction,
    value_weights,
    weight_stats,
)

__all__ = ["Valuation", "fd_values", "holdout_direction", "oracle_values", "oracle_traces", "per_sequence_nll",
           "ranks", "spearman", "standardize", "top_fraction", "value_traces", "value_weights", "weight_stats"]
