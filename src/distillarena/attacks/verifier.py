"""``verifier_filter``: rejection sampling as distillers do it: keep the traces a checker accepts.

For the built-in arithmetic task the checker is the task's own (``Task.check``: the final answer is the problem's;
``Task.step_validity``: every ``a<op>b=c`` step is right); for a user's task, a regex the completion must match
and/or a ``module:function`` called as ``f(prompt, completion) -> bool``. Threat model: it knows a verifier (the
problems' answers, as a distiller with a labelled problem set does). If the checker accepts nothing, the student
trains on every trace (as passive) and the cell says so: a distiller would not throw its whole budget away.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from distillarena.attacks.plan import AttackContext, Plan
from distillarena.attacks.spec import VerifierParams
from distillarena.core.errors import UserError


def load_callable(dotted: str) -> Callable[[str, str], bool]:
    module, _, name = dotted.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"verifier_filter callable {dotted!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise UserError(f"verifier_filter callable {dotted!r} is not a function")
    return fn


def accepts(ctx: AttackContext, params: VerifierParams) -> list[bool]:
    """Whether the checker accepts each trace."""
    check = params.checks()
    pattern = re.compile(params.pattern) if params.pattern else None
    fn = load_callable(params.callable) if params.callable else None
    out = []
    for r, problem in zip(ctx.records, ctx.problems, strict=True):
        text = r["completion"]
        ok = True
        if check in ("answer", "both"):
            ok = ok and bool(ctx.task.check(problem, text))
        if check in ("steps", "both"):
            v = ctx.task.step_validity(text)
            if v is None:
                raise UserError(f"verifier_filter check {check!r}: task {ctx.task.name} has no checkable steps; "
                                "use check: answer, a pattern or a callable")
            ok = ok and v >= params.min_step_validity - 1e-9
        if pattern is not None:
            ok = ok and pattern.search(text) is not None
        if fn is not None:
            ok = ok and bool(fn(r["prompt"], text))
        out.append(ok)
    return out


def plan(ctx: AttackContext, params: VerifierParams) -> Plan:
    ok = accepts(ctx, params)
    keep = [i for i, a in enumerate(ok) if a]
    info = {"accepted": len(keep), "accepted_fraction": len(keep) / max(ctx.n, 1), "verifier": params.checks()}
    if not keep:
        info["verifier_fallback"] = "the checker accepted no trace: trained on all of them"
        return Plan.uniform(list(range(ctx.n)), info=info)
    return Plan.uniform(keep, info=info)
