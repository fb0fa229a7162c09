r"""Full-vocabulary divergences, per target position, with analytic gradients.

Notation: ``p`` is the teacher distribution and ``q`` the student's, both ``softmax(logits / T)`` over the
support (the vocabulary for a dense signal; the k+1 buckets "top-k tokens + tail" for a top-k signal). Each
divergence ``D(p, q)`` is computed per position and summed over valid positions by the engine.

- fkl:  KL(p || q) = sum p (log p - log q)
- rkl:  KL(q || p) = sum q (log q - log p)
- jsd:  beta KL(p || M) + (1-beta) KL(q || M), M = beta p + (1-beta) q; ``beta=0.5``, ``unscaled=False``.
  TRL's generalized JSD: beta = 0 is exactly fkl, beta = 1 exactly rkl.
- tvd:  1/2 sum |p - q|
- skl:  KL(p || a p + (1-a) q), DistiLLM's skew forward KL; ``alpha=0.1``
- srkl: KL(q || (1-a) p + a q), DistiLLM's skew reverse KL; ``alpha=0.1``
- akl:  r_head KL(p || q) + r_tail KL(q || p), adaptive KL; ``mu=0.5``

**jsd and TRL.** The convention is TRL's (``GKDTrainer.generalized_jsd_loss``): ``beta`` weighs the *teacher*
and the mixture is ``M = beta p + (1 - beta) q``. TRL special-cases ``beta == 0`` and ``beta == 1`` to the
plain KLs, but for ``0 < beta < 1`` the value behaves like ``beta KL(p||q)`` as beta -> 0 and ``(1 - beta)
KL(q||p)`` as beta -> 1, so the loss is *discontinuous* at both ends (at beta = 0.01 it is about 100x smaller
than at beta = 0). ``unscaled=True`` divides the mixture form by ``beta (1 - beta)``, which is continuous on
[0, 1] with the exact KLs at the ends (at beta = 0.5 it is 4x TRL's value). The default keeps TRL's numbers.

**akl** (adaptive KL, as in the HPD repository's ``akl.py``): sort the teacher probabilities in decreasing
order; the *head* is the tokens whose cumulative teacher mass (inclusive) is <= ``mu``, always including the
top-1 token, and the *tail* is the rest. ``e_head = sum_head |p - q|``, ``e_tail = sum_tail |p - q|``;
``r_head = e_head / (e_head + e_tail)``, ``r_tail = 1 - r_head`` (0.5 / 0.5 when both are 0), both detached.
(The original AKL code of Wu et al. and DSKD define the tail from the *ascending* cumulative sum instead; the
split differs slightly.) The trainer in that repository adds a CE term; here AKL is the divergence alone.

**Gradients.** With ``qg_v = q_v dD/dq_v`` (the derivative with respect to the student log-prob), the gradient
with respect to the student logits ``z`` is ``dD/dz = (qg - q sum(qg)) / T``. Each divergence supplies ``qg``
in a numerically safe closed form (e.g. fkl: ``-p``, rkl: ``q (log q - log p + 1)``, jsd: ``(1-beta) q (log q
- log M)``), so no autograd graph over ``[chunk, V]`` is built. For a top-k signal, ``qg`` is per bucket and a
tail token ``v`` receives ``(q_v / q_tail) qg_tail``.

**Zero probabilities.** With finite logits, probabilities may underflow to 0 but their logs stay finite, and
every term ``x (log x - log y)`` is then ``0 * finite = 0``. A top-k tail bucket can have exactly zero mass
(``-inf``); those terms are guarded (``x = 0`` contributes 0), and a divergence that is genuinely infinite
(reverse KL with ``p = 0 < q``) is reported by the engine as an error naming the position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives.engine import ChunkResult, ObjectiveChunk, shifted_lse
from distillarena.objectives.registry import register_objective

__all__ = ["DIVERGENCES", "divergence_value_and_grad"]

# A divergence: (lq, lp, guard, **params) -> (value [C], qg [C, S] or None). lq/lp are log-probs over the
# support.
DivFn = Callable[..., tuple[Tensor, Tensor | None]]


def _xdiff(x: Tensor, lx: Tensor, ly: Tensor, guard: bool) -> Tensor:
    """x * (lx - ly), with 0 where x == 0 if guard (so 0 * log(0/0) and 0 * (-inf) give 0)."""
    out = lx - ly
    out.mul_(x)
    if guard:
        out = torch.where(x > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _ratio(lx: Tensor, ly: Tensor, x: Tensor, guard: bool) -> Tensor:
    """exp(lx - ly) (= x / y), with 0 where x == 0 if guard."""
    out = torch.exp(lx - ly)
    if guard:
        out = torch.where(x > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _fkl(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    p = lp.exp()
    value = _xdiff(p, lp, lq, guard).sum(-1)
    return value, (p.neg_() if want_grad else None)


def _rkl(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    q = lq.exp()
    t = _xdiff(q, lq, lp, guard)
    value = t.sum(-1)
    if not want_grad:
        return value, None
    return value, t.add_(q)  # q (log q - log p + 1)


def _mixture(lx: Tensor, ly: Tensor, wx: float) -> Tensor:
    """log(wx * x + (1 - wx) * y) in log space."""
    if wx <= 0.0:
        return ly.clone()
    if wx >= 1.0:
        return lx.clone()
    return torch.logaddexp(lx + math.log(wx), ly + math.log1p(-wx))


def _jsd(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool, beta: float) -> tuple[Tensor, Tensor | None]:
    if beta == 0.0:
        return _fkl(lq, lp, guard, want_grad)
    if beta == 1.0:
        return _rkl(lq, lp, guard, want_grad)
    lm = _mixture(lp, lq, beta)  # M = beta p + (1 - beta) q
    p = lp.exp()
    value = _xdiff(p, lp, lm, guard).sum(-1).mul_(beta)
    del p
    q = lq.exp()
    t = _xdiff(q, lq, lm, guard)
    value.add_(t.sum(-1), alpha=1.0 - beta)
    return value, (t.mul_(1.0 - beta) if want_grad else None)


def _tvd(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    q = lq.exp()
    d = q - lp.exp()
    value = d.abs().sum(-1).mul_(0.5)
    if not want_grad:
        return value, None
    return value, d.sign_().mul_(q).mul_(0.5)


def _skl(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    lm = _mixture(lp, lq, alpha)  # M = a p + (1 - a) q
    p = lp.exp()
    value = _xdiff(p, lp, lm, guard).sum(-1)
    if not want_grad:
        return value, None
    # qg = q * d/dq [-sum p log M] = -(1 - a) p q / M
    r = _ratio(lq, lm, lq.exp(), guard)
    return value, r.mul_(p).mul_(-(1.0 - alpha))


def _srkl(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool, alpha: float) -> tuple[Tensor, Tensor | None]:
    lm = _mixture(lq, lp, alpha)  # M = a q + (1 - a) p
    q = lq.exp()
    t = _xdiff(q, lq, lm, guard)
    value = t.sum(-1)
    if not want_grad:
        return value, None
    # qg = q (log q - log M + 1 - a q / M)
    r = _ratio(lq, lm, q, guard)
    t.add_(q).sub_(r.mul_(q).mul_(alpha))
    return value, t


def _akl(lq: Tensor, lp: Tensor, guard: bool, want_grad: bool, mu: float) -> tuple[Tensor, Tensor | None, Tensor]:
    p = lp.exp()
    q = lq.exp()
    with torch.no_grad():
        sp, order = p.sort(dim=-1, descending=True, stable=True)  # ties: lower token id first
        err = (sp - q.gather(-1, order)).abs_()
        del order
        tail = sp.cumsum_(-1) > mu
        tail[:, 0] = False
        e_tail = (err * tail).sum(-1)
        e_head = err.sum(-1) - e_tail
        del err, tail, sp
        total = e_head + e_tail
        half = torch.full_like(total, 0.5)
        r_head = torch.where(total > 0, e_head / total.clamp(min=1e-30), half)
        r_tail = torch.where(total > 0, e_tail / total.clamp(min=1e-30), half)
    fkl = _xdiff(p, lp, lq, guard).sum(-1)
    t = _xdiff(q, lq, lp, guard)
    rkl = t.sum(-1)
    value = r_head * fkl + r_tail * rkl
    if not want_grad:
        return value, None, r_head
    # qg = r_head * (-p) + r_tail * q (log q - log p + 1)
    t.add_(q).mul_(r_tail.unsqueeze(-1)).sub_(p.mul_(r_head.unsqueeze(-1)))
    return value, t, r_head


DIVERGENCES: dict[str, DivFn] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
    "skl": _skl,
    "srkl": _srkl,
    "akl": _akl,
}


def divergence_value_and_grad(
    name: str, lq: Tensor, lp: Tensor, *, guard: bool = True, want_grad: bool = True, **params: Any
) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence ``name`` between log-prob rows ``lq`` (student) and ``lp`` (teacher), and ``qg``
    (its derivative with respect to ``lq`` treated as free log-probs). Inputs are not modified."""
    out = DIVERGENCES[name](lq, lp, guard, want_grad, **params)
    return out[0], out[1]


def _jsd_unscale(beta: float, unscaled: bool) -> float:
    if unscaled and 0.0 < beta < 1.0:
        return 1.0 / (beta * (1.0 - beta))
    return 1.0


def _run(chunk: ObjectiveChunk, name: str, params: dict[str, Any], scale: float = 1.0) -> ChunkResult:
    """Shared driver: log-probs over the support, divergence, then the gradient w.r.t. the raw student
    logits."""
    want = chunk.needs_grad
    T = chunk.temperature
    metrics: dict[str, tuple[Tensor | float, Tensor | float]] = {}
    if chunk.teacher_kind == "dense":
        z, t = chunk.take_logits()
        assert t is not None
        lq = F.log_softmax(z, dim=-1)
        del z
        lp = F.log_softmax(t, dim=-1)
        del t
        out = DIVERGENCES[name](lq, lp, False, want, **params)
        del lp
        value, qg = out[0], out[1]
        if name == "akl":
            metrics["akl/head_ratio"] = (out[2].sum(), float(out[2].numel()))
        if scale != 1.0:
            value = value * scale
        if not want:
            return ChunkResult(loss=value, metrics=metrics)
        assert qg is not None
        # dz = (qg - q * sum(qg)) / T, in place in qg
        s = qg.sum(-1, keepdim=True)
        q = lq.exp_()
        grad = qg.addcmul_(q, s, value=-1.0)
        del q, lq
        mult = scale / T
        if mult != 1.0:
            grad.mul_(mult)
        return ChunkResult(loss=value, grad=grad, metrics=metrics)

    # top-k signal: divergence between the (k+1)-bucket distributions
    assert chunk.teacher_kind == "topk" and chunk.topk_ids is not None and chunk.tail_logprob is not None
    z, _ = chunk.take_logits()
    ids = chunk.topk_ids
    k = ids.shape[-1]
    shifted, lse = shifted_lse(z)
    del z
    rest = torch.logsumexp(shifted.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)  # tail, unnormalised
    lq_b = torch.cat([shifted.gather(-1, ids) - lse, rest - lse], dim=-1)
    lp_b = chunk.teacher_logprobs()
    out = DIVERGENCES[name](lq_b, lp_b, True, want, **params)
    value, qg = out[0], out[1]
    metrics["topk/teacher_tail_mass"] = (chunk.tail_logprob.exp().sum(), float(ids.shape[0]))
    if scale != 1.0:
        value = value * scale
    if not want:
        return ChunkResult(loss=value, metrics=metrics)
    assert qg is not None
    s = qg.sum(-1, keepdim=True)
    has_tail = torch.isfinite(rest)
    coef = torch.where(has_tail, qg[:, k:], torch.zeros_like(rest))
    # tail tokens: (q_v / q_tail) * qg_tail = exp(z_v - lse_tail) * qg_tail; then the top-k tokens get their own qg
    grad = torch.exp(shifted - torch.where(has_tail, rest, lse)).mul_(coef)
    grad.scatter_(-1, ids, qg[:, :k])
    grad.sub_(shifted.sub_(lse).exp_().mul_(s))  # - q * sum(qg)
    mult = scale / T
    if mult != 1.0:
        grad.mul_(mult)
    return ChunkResult(loss=value, grad=grad, metrics=metrics)


def _check_unit(name: str, lo_open: bool = False, hi_open: bool = False) -> Callable[[dict[str, Any]], None]:
    def check(params: dict[str, Any]) -> None:
        v = params[name]
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a number in [0, 1], got {params[name]!r}") from None
        ok = (0.0 < v if lo_open else 0.0 <= v) and (v < 1.0 if hi_open else v <= 1.0)
        if not ok:
            lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
            raise UserError(f"{name} must be in {lo}0, 1{hi}, got {v}")
        params[name] = v

    return check


_FULL = ("dense", "topk")


@register_objective("fkl", signals=_FULL, returns_grad=True)
def fkl(chunk: ObjectiveChunk) -> ChunkResult:
    """Forward KL(p_T || q_S): mass-covering."""
    return _run(chunk, "fkl", {})


@register_objective("rkl", signals=_FULL, returns_grad=True)
def rkl(chunk: ObjectiveChunk) -> ChunkResult:
    """Reverse KL(q_S || p_T): mode-seeking."""
    return _run(chunk, "rkl", {})


@register_objective("jsd", signals=_FULL, returns_grad=True, validate=_check_unit("beta"))
def jsd(chunk: ObjectiveChunk, *, beta: float = 0.5, unscaled: bool = False) -> ChunkResult:
    """Generalized JSD(beta), TRL convention (beta=0 forward KL, beta=1 reverse KL); unscaled=True divides by
    beta(1-beta)."""
    return _run(chunk, "jsd", {"beta": beta}, _jsd_unscale(beta, unscaled))


@register_objective("tvd", signals=_FULL, returns_grad=True)
def tvd(chunk: ObjectiveChunk) -> ChunkResult:
    """Total variation distance 1/2 sum |p - q|."""
    return _run(chunk, "tvd", {})


@register_objective("skl", signals=_FULL, returns_grad=True, validate=_check_unit("alpha"))
def skl(chunk: ObjectiveChunk, *, alpha: float = 0.1) -> ChunkResult:
    """Skew forward KL(p || a p + (1-a) q) (DistiLLM)."""
    return _run(chunk, "skl", {"alpha": alpha})


@register_objective("srkl", signals=_FULL, returns_grad=True, validate=_check_unit("alpha"))
def srkl(chunk: ObjectiveChunk, *, alpha: float = 0.1) -> ChunkResult:
    """Skew reverse KL(q || (1-a) p + a q) (DistiLLM)."""
    return _run(chunk, "srkl", {"alpha": alpha})


@register_objective("akl", signals=("dense",), returns_grad=True, validate=_check_unit("mu", lo_open=True))
def akl(chunk: ObjectiveChunk, *, mu: float = 0.5) -> ChunkResult:
    """Adaptive KL: head/tail-error-weighted mix of forward and reverse KL (HPD repository's definition)."""
    return _run(chunk, "akl", {"mu": mu})
