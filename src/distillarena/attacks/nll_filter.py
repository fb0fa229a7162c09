"""``nll_filter``: keep the ``keep`` fraction of traces the student finds most likely (lowest mean token NLL over
the completion; ``prefer: high``: least likely), uniform weights. A cheap baseline filter: no holdout, no
verifier, one forward pass over the traces."""

from __future__ import annotations

import math

import torch

from distillarena.attacks.lm import batches, per_sequence_nll
from distillarena.attacks.plan import AttackContext, Plan
from distillarena.attacks.spec import NLLFilterParams


@torch.no_grad()
def trace_nll(model: torch.nn.Module, encoded, pad_id: int) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([per_sequence_nll(model, b).double().cpu() for b in batches(encoded, pad_id)])
    finally:
        model.train(was)


def plan(ctx: AttackContext, params: NLLFilterParams) -> Plan:
    nll = trace_nll(ctx.student, ctx.encoded, ctx.pad_id)
    k = max(1, math.ceil(params.keep * ctx.n - 1e-9))
    sign = 1.0 if params.prefer == "low" else -1.0
    order = sorted(range(ctx.n), key=lambda i: (sign * float(nll[i]), i))
    keep = sorted(order[:k])
    return Plan.uniform(keep, values=[-float(x) for x in nll],
                        info={"kept": len(keep), "mean_nll_kept": float(nll[keep].mean()),
                              "mean_nll_all": float(nll.mean())})
