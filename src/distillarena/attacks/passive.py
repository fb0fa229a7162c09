"""``passive``: train on every trace bought, uniform weights (the baseline every attacker is compared with)."""

from __future__ import annotations

from distillarena.attacks.plan import AttackContext, Plan
from distillarena.attacks.spec import PaperParams


def plan(ctx: AttackContext, params: PaperParams) -> Plan:
    return Plan.uniform(list(range(ctx.n)))
