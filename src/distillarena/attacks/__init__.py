"""The attacker's side of the distillation game: the table of attacker kinds (:mod:`.spec`, torch-free), what a plan
receives and returns (:mod:`.plan`), one module per kind holding its planning code, and the trace valuation they
share (finite-difference value, weights, filtering, the one-step oracle; :mod:`.valuation`, :mod:`.lm`)."""

import importlib
from typing import Any

# Imported on first use: `distillarena.attacks.spec` (the attacker table) must load without torch, and importing it
# runs this file first.
_WHERE = {
    "Valuation": "distillarena.attacks.valuation",
    "fd_values": "distillarena.attacks.valuation",
    "holdout_direction": "distillarena.attacks.valuation",
    "oracle_values": "distillarena.attacks.valuation",
    "ranks": "distillarena.attacks.valuation",
    "spearman": "distillarena.attacks.valuation",
    "spearman_interval": "distillarena.attacks.valuation",
    "standardize": "distillarena.attacks.valuation",
    "top_fraction": "distillarena.attacks.valuation",
    "value_weights": "distillarena.attacks.valuation",
    "weight_stats": "distillarena.attacks.valuation",
    "oracle_traces": "distillarena.attacks.lm",
    "per_sequence_nll": "distillarena.attacks.lm",
    "value_traces": "distillarena.attacks.lm",
    "cosine_values": "distillarena.attacks.lm",
}


def get_planner(kind: str):
    """The ``plan(ctx, params) -> Plan`` function of attacker ``kind`` (its module imported now)."""
    from distillarena.attacks.spec import attacker_spec

    module, _, name = attacker_spec(kind).planner.partition(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE) + ["get_planner"]
