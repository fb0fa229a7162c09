"""The distillation game: collect (defended) teacher traces within a query budget, let passive and adaptive
attackers train on them, measure teacher utility against student capability recovery, sweep it all with a
per-cell cache, and report."""

from distillarena.game.metrics import aggregate, gaps, recovery
from distillarena.game.sweep import plan_cells, rebuild, run_game

__all__ = ["aggregate", "gaps", "plan_cells", "rebuild", "recovery", "run_game"]
