"""The adaptive student's per-trace value, its weights, filtering, and the oracle that checks the value.

Generic over callables, so the same code values language-model traces and the closed-form toy cases of the tests:

* ``holdout_loss(model) -> Iterable[Tensor]``: scalar terms whose *sum* is the student's holdout loss ``L_H``
  (one term per batch, so the gradient is accumulated batch by batch);
* ``trace_losses(model) -> Tensor [N]``: each trace's loss ``NLL_i`` (for language models: the trace's mean
  token NLL over its completion, length-normalised as in the reference code).

Value (central finite difference along the holdout gradient)
-----------------------------------------------------------
With ``u = g / ||g||`` the *unit* gradient of ``L_H`` at the student's current weights ``θ``::

    a_i = [ NLL_i(θ + ε u) − NLL_i(θ − ε u) ] / (2 ε)  ≈  ⟨∇NLL_i, u⟩

One SGD step of learning rate η on trace i moves the holdout loss by ``ΔL_H ≈ −η ⟨∇L_H, ∇NLL_i⟩ = −η ||g|| a_i``:
a trace with ``a_i > 0`` is one whose descent direction is also a descent direction of the holdout loss (helpful);
``a_i < 0`` one that first-order analysis calls harmful. ``g`` is normalised to unit norm so that ``ε`` is a
distance in weight space whatever the scale of the holdout loss (the raw ``||g||`` is returned for the record).

**Difference from the reference code** (``ysfalh/distillation-game``, ``compute_trace_weights_fd``): it computes
``a_repo = [NLL_i(θ − ε g) − NLL_i(θ + ε g)] / (2ε) = −a_i`` (unnormalised ``g``) and weights ``exp(+β a_repo)``,
which upweights the traces that a first-order analysis calls *harmful* (see ``reference/distillation-game.md``,
§2, sign caveat). Here the sign is a parameter: ``sign=+1`` (default) gives ``w = exp(+β a)``, upweighting the
traces whose training lowers the holdout loss; ``sign=−1`` reproduces the reference code's weighting.

Weights
-------
``z = (a − mean a) / std a`` (standardised, so that β does not depend on ε, ||g|| or the size of the model; a
constant ``a`` gives ``z = 0``; ``standardize=False`` keeps the raw ``a`` as the reference code does), clipped to
``[−c, c]``, then ``w = exp(β · sign · clip(z))`` normalised to mean 1. ``β = 0`` is the passive student.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distillarena.core.errors import UserError

HoldoutLoss = Callable[[torch.nn.Module], Iterable[Tensor]]
TraceLosses = Callable[[torch.nn.Module], Tensor]


def trainable(model: torch.nn.Module) -> list[Tensor]:
    """The parameters that carry gradients (distinct tensors; tied weights counted once)."""
    seen: dict[int, Tensor] = {}
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen[id(p)] = p
    if not seen:
        raise UserError("the student has no trainable parameters to value traces with")
    return list(seen.values())


def holdout_direction(model: torch.nn.Module, holdout_loss: HoldoutLoss) -> tuple[list[Tensor], float]:
    """The unit gradient ``u = g / ||g||`` of the holdout loss at the current weights, and ``||g||``.

    A zero gradient gives ``u = 0`` (every value is then 0 and every weight 1)."""
    params = trainable(model)
    was = model.training
    model.eval()
    grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    try:
        for term in holdout_loss(model):
            gs = torch.autograd.grad(term, params, allow_unused=True)
            for acc, g in zip(grads, gs, strict=True):
                if g is not None:
                    acc += g.to(acc.dtype)
    finally:
        model.train(was)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    if norm > 0:
        grads = [g / norm for g in grads]
    return grads, norm


@torch.no_grad()
def fd_values(model: torch.nn.Module, trace_losses: TraceLosses, direction: Sequence[Tensor],
              eps: float = 1e-2) -> Tensor:
    """``a_i = [NLL_i(θ + ε u) − NLL_i(θ − ε u)] / (2ε)`` for every trace (float64 ``[N]``); the weights are
    restored exactly afterwards."""
    if not (eps > 0 and math.isfinite(eps)):
        raise UserError(f"the finite-difference step eps must be > 0, got {eps}")
    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    was = model.training
    model.eval()
    try:
        for p, s, u in zip(params, saved, direction, strict=True):
            p.copy_(s + eps * u.to(p.dtype))
        plus = trace_losses(model).double()
        for p, s, u in zip(params, saved, direction, strict=True):
            p.copy_(s - eps * u.to(p.dtype))
        minus = trace_losses(model).double()
    finally:
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
        model.train(was)
    return (plus - minus) / (2 * eps)


def standardize(a: Tensor) -> Tensor:
    """``(a − mean) / std``; zeros when ``a`` is constant (or has one element)."""
    a = a.double()
    if a.numel() < 2:
        return torch.zeros_like(a)
    std = float(a.std())
    if not std > 0:
        return torch.zeros_like(a)
    return (a - a.mean()) / std


def value_weights(a: Tensor, beta: float, *, sign: int = 1, clip: float = 3.0, standardized: bool = True) -> Tensor:
    """Weights ``exp(β · sign · clip(z, −c, c))`` normalised to mean 1 (``z``: standardised ``a``, see above)."""
    if not (beta >= 0 and math.isfinite(beta)):
        raise UserError(f"beta must be >= 0 (the tilt towards high-value traces), got {beta}")
    if sign not in (1, -1):
        raise UserError(f"sign must be +1 or -1, got {sign}")
    if not clip > 0:
        raise UserError(f"clip must be > 0, got {clip}")
    if a.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    z = standardize(a) if standardized else a.double()
    w = torch.exp(beta * sign * z.clamp(-clip, clip))
    return w / w.mean()


def top_fraction(a: Tensor, keep: float, *, sign: int = 1) -> Tensor:
    """Indices (sorted) of the ``ceil(keep · N)`` traces of highest ``sign · a`` (ties: lower index first)."""
    if not 0 < keep <= 1:
        raise UserError(f"the kept fraction must be in (0, 1], got {keep}")
    if sign not in (1, -1):
        raise UserError(f"sign must be +1 or -1, got {sign}")
    n = a.numel()
    k = max(1, math.ceil(keep * n - 1e-9)) if n else 0
    order = sorted(range(n), key=lambda i: (-sign * float(a[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def weight_stats(a: Tensor, w: Tensor) -> dict[str, float]:
    """What the reference code logs (mean and std of ``a``, the weight share of the top 20% of traces) and the
    effective sample size ``(Σw)² / Σw²`` as a fraction of N."""
    n = w.numel()
    if n == 0:
        return {}
    top = torch.sort(w.double(), descending=True).values[: max(1, math.ceil(0.2 * n))]
    return {"mean_a": float(a.double().mean()), "std_a": float(a.double().std()) if n > 1 else 0.0,
            "frac_mass_top20": float(top.sum() / w.double().sum()),
            "ess_fraction": float(w.double().sum() ** 2 / (w.double().pow(2).sum() * n)),
            "max_weight": float(w.max()), "min_weight": float(w.min())}


# --------------------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------------------


def oracle_values(model: torch.nn.Module, step_loss: Callable[[torch.nn.Module, int], Tensor],
                  holdout_loss: HoldoutLoss, indices: Iterable[int], lr: float) -> Tensor:
    """The actual holdout-loss *decrease* ``L_H(θ) − L_H(θ − lr ∇NLL_i(θ))`` after one plain SGD step on each
    trace ``i`` of ``indices`` (float64; positive = the step helped), the weights restored after each.

    Affordable at toy scale only (one backward per trace and one holdout pass per trace). Its orientation is the
    value's under the default sign: to first order it equals ``lr · ||g|| · a_i``."""
    if not (lr > 0 and math.isfinite(lr)):
        raise UserError(f"the oracle's learning rate must be > 0, got {lr}")
    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    was = model.training
    model.eval()

    def total_holdout() -> float:
        with torch.no_grad():
            return float(sum(float(t) for t in holdout_loss(model)))

    out = []
    try:
        base = total_holdout()
        for i in indices:
            loss = step_loss(model, int(i))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(lr * g.to(p.dtype))
            out.append(base - total_holdout())
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        model.train(was)
    return torch.tensor(out, dtype=torch.float64)


def ranks(x: Tensor) -> Tensor:
    """Ranks 1..N with ties given their average rank (float64)."""
    x = x.double().flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    r = torch.empty(n, dtype=torch.float64)
    sx = x[order]
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sx[j + 1] == sx[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant or
    there are fewer than two pairs."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman: {x.numel()} values against {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx.pow(2).sum()) * float(ry.pow(2).sum()))
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def spearman_interval(x: Tensor, y: Tensor, *, replicates: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of the pairs ``(x_i, y_i)`` with a 95% percentile-bootstrap interval (pairs resampled with
    replacement); NaNs where undefined."""
    rho = spearman(x, y)
    n = x.numel()
    if n < 3 or not math.isfinite(rho):
        return rho, float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(replicates):
        idx = torch.randint(0, n, (n,), generator=g)
        r = spearman(x[idx], y[idx])
        if math.isfinite(r):
            reps.append(r)
    if not reps:
        return rho, float("nan"), float("nan")
    q = torch.quantile(torch.tensor(reps, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return rho, float(q[0]), float(q[1])


@dataclass
class Valuation:
    values: Tensor  # a_i, float64 [N]
    grad_norm: float  # ||g|| of the holdout loss at the weights valued
    eps: float
