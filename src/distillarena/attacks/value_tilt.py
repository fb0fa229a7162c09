"""The value-tilting students: the paper's (``adaptive``, ``filter``, ``value_tilt`` with ``form: paper``) and the
competent one (``value_tilt``).

The paper's form values every trace once, at the untrained student, by the finite-difference projection of its
NLL gradient on the unit holdout gradient (:mod:`.valuation`), with the task's reference solutions as holdout, and
tilts (``w = exp(beta * sign * clip(z))``) or filters. Measured on this world (issue 14) that value is mostly a
gradient-norm detector and the first-order picture does not survive several epochs of AdamW.

The competent form changes four things, each a parameter:

* **warm start** (``warm_fraction`` of the training steps): the student first trains passively (uniform weights),
  in the same run, and the traces are valued at that student (whose gradients are no longer dominated by what the
  base student has not learned at all); the tilt applies to the remaining steps;
* **refresh** (``refresh_every``): the values and weights are recomputed every K steps after that;
* **cosine value** (``value: cosine``): the cosine between each trace's NLL gradient and the holdout gradient,
  computed exactly (one backward per trace), so a trace is not favoured for its gradient's length;
* **holdout** (``holdout: teacher``): the undefended teacher's completions of holdout prompts, as the reference
  code (about 2.2k undefended teacher traces there), not reference solutions.

The one-step oracle (``cfg.oracle``: the actual holdout-loss decrease after one SGD step on each of ``n_traces``
traces) is run at the student the values were first computed at; its Spearman correlation with the value comes
with a bootstrap interval. Both signs are ordinary attackers (``sign: 1`` and ``sign: -1`` in one sweep).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from distillarena.attacks.lm import cosine_values, oracle_traces, value_traces
from distillarena.attacks.plan import AttackContext, Plan
from distillarena.attacks.spec import PaperParams, ValueTiltParams
from distillarena.attacks.valuation import spearman, spearman_interval, top_fraction, value_weights, weight_stats


def oracle_check(model: torch.nn.Module, ctx: AttackContext, holdout, values: Tensor, *,
                 extra: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Spearman's rho (with its 95% interval) between ``values`` and the one-step oracle on ``cfg.oracle.n_traces``
    traces drawn with the cell's seed; ``extra``: other per-trace quantities correlated with the oracle too."""
    n_traces = int(ctx.cfg.oracle.n_traces)
    if not n_traces:
        return {}
    g = torch.Generator().manual_seed(ctx.seed)
    idx = sorted(torch.randperm(ctx.n, generator=g)[:n_traces].tolist())
    t0 = time.perf_counter()
    oracle = oracle_traces(model, ctx.encoded, holdout, idx, pad_id=ctx.pad_id, lr=ctx.cfg.oracle.lr)
    rho, lo, hi = spearman_interval(values[idx], oracle, seed=ctx.seed)
    out: dict[str, Any] = {"oracle_spearman": rho if math.isfinite(rho) else None,
                           "oracle_spearman_ci": [lo, hi] if math.isfinite(lo) else None, "oracle_n": len(idx),
                           "oracle_s": time.perf_counter() - t0, "oracle_mean_decrease": float(oracle.mean())}
    for name, x in (extra or {}).items():
        r = spearman(x[idx], oracle)
        out[f"oracle_spearman_{name}"] = r if math.isfinite(r) else None
    return out


def _paper(ctx: AttackContext, *, beta: float, sign: int, clip: float, standardize: bool, eps: float,
           keep: float | None) -> Plan:
    """Value once at the untrained student (finite differences, reference holdout), then tilt or filter."""
    holdout = ctx.holdout("reference")
    t0 = time.perf_counter()
    val = value_traces(ctx.student, ctx.encoded, holdout, pad_id=ctx.pad_id, eps=eps)
    a = val.values
    info: dict[str, Any] = {"valuation_s": time.perf_counter() - t0, "holdout_grad_norm": val.grad_norm,
                            "holdout_source": "reference"}
    if keep is None:
        w = value_weights(a, beta, sign=sign, clip=clip, standardized=standardize)
        plan = Plan(list(range(ctx.n)), [float(x) for x in w], info, [float(x) for x in a])
        info.update(weight_stats(a, w))
    else:
        kept = top_fraction(a, keep, sign=sign).tolist()
        plan = Plan.uniform(kept, info=info, values=[float(x) for x in a])
        info["kept"] = len(kept)
    info.update(oracle_check(ctx.student, ctx, holdout, a))
    return plan


def plan_adaptive(ctx: AttackContext, p: PaperParams) -> Plan:
    return _paper(ctx, beta=p.beta, sign=p.sign, clip=p.clip, standardize=p.standardize, eps=p.eps, keep=None)


def plan_filter(ctx: AttackContext, p: PaperParams) -> Plan:
    return _paper(ctx, beta=p.beta, sign=p.sign, clip=p.clip, standardize=p.standardize, eps=p.eps, keep=p.keep)


def tilt(a: Tensor, p: ValueTiltParams) -> Tensor:
    """Weights (mean 1) from values: the clipped exponential tilt, or (``keep < 1``) the kept fraction of highest
    ``sign * value`` at weight ``1 / keep`` and the rest at 0, so the mean weight, and the loss's scale, stay 1."""
    if p.keep < 1:
        kept = top_fraction(a, p.keep, sign=p.sign)
        w = torch.zeros(a.numel(), dtype=torch.float64)
        w[kept] = 1.0
        return w / w.mean()
    return value_weights(a, p.beta, sign=p.sign, clip=p.clip, standardized=True)


class Refresh:
    """Values and weights recomputed during training: first at ``warm_steps`` (after the passive warm start), then
    every ``refresh_every`` steps. The training loop calls it every ``every`` steps with the student it trains."""

    def __init__(self, ctx: AttackContext, p: ValueTiltParams, holdout, info: dict[str, Any], plan: Plan,
                 warm_steps: int):
        self.ctx, self.p, self.holdout, self.info, self.plan = ctx, p, holdout, info, plan
        self.warm_steps = warm_steps
        self.every = math.gcd(warm_steps, p.refresh_every) if p.refresh_every else warm_steps
        self.valuations = 0

    def due(self, step: int) -> bool:
        w, k = self.warm_steps, self.p.refresh_every
        return step == w or (k > 0 and step > w and (step - w) % k == 0)

    def __call__(self, model: torch.nn.Module, step: int) -> list[float] | None:
        if not self.due(step):
            return None
        return self.value_and_weigh(model, step)

    def value_and_weigh(self, model: torch.nn.Module, step: int) -> list[float]:
        ctx, p = self.ctx, self.p
        t0 = time.perf_counter()
        extra: dict[str, Tensor] = {}
        if p.value == "cosine":
            a, proj, norms, gnorm = cosine_values(model, ctx.encoded, self.holdout, pad_id=ctx.pad_id)
            extra = {"projection": proj, "grad_norm": norms}
            corr = spearman(proj, norms)
            self.info.setdefault("spearman_projection_gradnorm", corr if math.isfinite(corr) else None)
            corr = spearman(a, norms)
            self.info.setdefault("spearman_value_gradnorm", corr if math.isfinite(corr) else None)
        else:
            val = value_traces(model, ctx.encoded, self.holdout, pad_id=ctx.pad_id, eps=p.eps)
            a, gnorm = val.values, val.grad_norm
        w = tilt(a, p)
        self.info["valuation_s"] = self.info.get("valuation_s", 0.0) + time.perf_counter() - t0
        self.valuations += 1
        self.info["valuations"] = self.valuations
        self.info["valued_at_steps"] = [*self.info.get("valued_at_steps", []), step]
        if self.valuations == 1:  # the oracle and the weight statistics at the first valuation
            self.info["holdout_grad_norm"] = gnorm
            self.info.update(weight_stats(a, w))
            self.info.update(oracle_check(model, ctx, self.holdout, a, extra=extra))
        self.plan.values = [float(x) for x in a]
        return [float(x) for x in w]


def plan(ctx: AttackContext, p: ValueTiltParams) -> Plan:
    if p.form == "paper":
        return _paper(ctx, beta=p.beta, sign=p.sign, clip=p.clip, standardize=True, eps=p.eps,
                      keep=None if p.keep >= 1 else p.keep)
    holdout = ctx.holdout(p.holdout)
    steps = int(ctx.cfg.train.steps)
    warm = min(max(1, round(p.warm_fraction * steps)), steps - 1) if p.warm_fraction > 0 and steps > 1 else 0
    info: dict[str, Any] = {"holdout_source": p.holdout, "holdout_n": len(holdout), "warm_steps": warm,
                            "refresh_every": p.refresh_every, "value": p.value}
    out = Plan.uniform(list(range(ctx.n)), info=info)
    refresh = Refresh(ctx, p, holdout, info, out, warm)
    if warm == 0:  # value the untrained student now
        out.weights = refresh.value_and_weigh(ctx.student, 0)
        if p.refresh_every:
            refresh.every = p.refresh_every
            out.reweigh = refresh
    else:
        out.reweigh = refresh
    return out
