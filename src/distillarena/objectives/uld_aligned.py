r"""Objectives for a teacher and a student that do not share a vocabulary (``cross_vocab=True``).

Both read a dense or top-k teacher signal whose rows are the teacher's distributions, over the *teacher's*
vocabulary, at the student's positions (a :class:`~distillarena.objectives.signals.CrossVocab` says how the two
tokenizations line up; ``distillarena.teachers.cross`` builds it). ``p`` is the teacher's distribution at the
paired teacher position, ``q`` the student's, both ``softmax(logits / T)``; ``a*`` is the student's label.

**uld** (Universal Logit Distillation, Boizard et al. 2024, arXiv 2402.12030), per valid position::

    ce_weight * (-log q(a*))  +  uld_weight * sum_r |q_(r) - p_(r)|        (the second term at paired positions)

where ``q_(r)`` and ``p_(r)`` are the r-th largest probabilities, the shorter vector padded with zeros to the
longer one's length: the Wasserstein-1 distance between the two distributions with every token one unit from
every other, in closed form. No token identity is used, so it needs no vocabulary map. Defaults as in the
authors' code (``cross_entropy_factor = 1``, ``distil_factor = 1.5``, temperature 1). Differences from it: the
loss is a sum over positions normalised once by the global count (the paper's code averages the distance per
sequence, then over the batch), and which teacher position a student position is compared with is the caller's
choice (``teachers.cross``: the paper's positional pairing or the character-offset one).

With a top-k signal the teacher's sorted vector is known for its k largest entries plus the tail mass; the
distance is then computed between the (k+1)-bucket sorted vectors (the k largest probabilities, then everything
else): ``sum_{r<=k} |q_(r) - p_(r)| + |Q_tail - P_tail|``, exact for those coarse vectors and, by the triangle
inequality, a lower bound of the full distance (as the other objectives' top-k values are lower bounds).

Gradient: with ``g_v = sign(q_v - p_(rank of v in q))`` (``sign(Q_tail - P_tail)`` for a token ranked past k),
``dW/dz = q (g - <q, g>) / T``; ties and exact equality take the subgradient 0 of ``|x|`` at 0.

**aligned** (aligned-span distillation, as TRL's GOLD and NeMo-RL's token aligner do it), per valid position:

- a *matched* position (a one-to-one span: the same characters, one token on each side, the same text before):
  the forward KL (``beta = 0``, the default; TRL's generalized JSD for ``0 < beta <= 1``) between the teacher's and
  the student's distributions over the *shared* tokens (those whose strings both vocabularies hold,
  ``vocab_map``) plus one bucket for everything else. Exact for those coarse distributions, as a top-k signal's
  divergence is.
- any other paired position (inside a span that one side splits into several tokens): ``merged_weight`` (default
  1) times ``-P_t(span) log q(a*)``, the one-hot forward-KL term of the merged span: the teacher's probability of
  the whole span's characters (``span_logprob``, the product of its token probabilities) weighs the student's
  log-likelihood of its own tokens there (for a one-token span this is ``seqkd``'s weight ``p(a*)``); and
  ``uld_weight`` (default 0) times the ULD distance above, to the teacher token holding the student token's first
  character.
- every position: ``ce_weight * (-log q(a*))`` (default 0).

The defaults are measured choices (``docs/decisions.md``): ULD alone inside merged spans teaches the student the
*shape* of the teacher's distribution but not which token carries its mass (the student's NLL of the teacher's
text rose above its untrained value), and a JSD(0.5) on matched spans stalled where the student started with
almost no mass on the teacher's token (its gradient vanishes there; the forward KL's does not).

With a teacher of the *same* tokenizer (no ``cross``) every position is matched through the identity map, so
``aligned`` is then exactly ``jsd`` with the same ``beta`` (forward KL at the default), plus the CE term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives.divergences import divergence_value_and_grad
from distillarena.objectives.engine import ChunkResult, ObjectiveChunk, shifted_lse
from distillarena.objectives.registry import register_objective

__all__ = ["uld_distance", "shared_bucket_divergence", "sorted_teacher_probs"]

Metrics = dict[str, tuple[Tensor | float, Tensor | float]]


# ------------------------------------------------------------------------------------------------------------
# The pieces
# ------------------------------------------------------------------------------------------------------------


def sorted_teacher_probs(chunk: ObjectiveChunk, t: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """The teacher's probabilities at ``rows`` of the chunk, sorted in decreasing order: ``[R, Vt]`` for a dense
    signal (its tempered logits ``t``, and None), or ``[R, k]`` and the tail mass ``[R]`` for a top-k signal."""
    if chunk.teacher_kind == "dense":
        assert t is not None
        p = torch.softmax(t[rows], dim=-1)
        return p.sort(dim=-1, descending=True).values, None
    assert chunk.topk_logprobs is not None and chunk.tail_logprob is not None
    p = chunk.topk_logprobs[rows].exp()
    return p.sort(dim=-1, descending=True).values, chunk.tail_logprob[rows].exp()


def uld_distance(shifted: Tensor, lse: Tensor, p_sorted: Tensor, p_tail: Tensor | None,
                 want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """ULD distance ``[R]`` between the student ``softmax`` (given as ``shifted`` logits ``[R, V]`` and their
    ``lse`` ``[R, 1]``) and a teacher's sorted probabilities ``p_sorted`` (``[R, K]``, decreasing), plus ``g``
    ``[R, V]``, its derivative with respect to the student probabilities (None unless ``want_grad``).

    ``p_tail`` None: ``p_sorted`` is the teacher's whole distribution (the shorter vector is padded with zeros).
    Otherwise ``p_sorted`` is its top k and ``p_tail`` ``[R]`` the rest: the (k+1)-bucket distance."""
    R, V = shifted.shape
    K = p_sorted.shape[-1]
    q = (shifted - lse).exp()
    if p_tail is None:
        q_sorted, order = q.sort(dim=-1, descending=True)
        n = max(V, K)
        diff = F.pad(q_sorted, (0, n - V)) - F.pad(p_sorted, (0, n - K))
        value = diff.abs().sum(-1)
        if not want_grad:
            return value, None
        g = torch.empty_like(q).scatter_(-1, order, diff[:, :V].sign())
        return value, g
    kk = min(K, V)
    q_top, order = q.topk(kk, dim=-1)
    if kk < V:
        q_tail = (torch.logsumexp(shifted.scatter(-1, order, float("-inf")), dim=-1) - lse.squeeze(-1)).exp()
    else:
        q_tail = torch.zeros_like(p_tail)
    diff = F.pad(q_top, (0, K - kk)) - p_sorted
    d_tail = q_tail - p_tail
    value = diff.abs().sum(-1) + d_tail.abs()
    if not want_grad:
        return value, None
    g = d_tail.sign().unsqueeze(-1).expand(R, V).contiguous()
    g.scatter_(-1, order, diff[:, :kk].sign())
    return value, g


def shared_bucket_divergence(shifted: Tensor, lse: Tensor, student_ids: Tensor, lp_buckets: Tensor,
                             lp_rest: Tensor, beta: float, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Generalized JSD(beta) between the teacher's and the student's distributions over buckets: one per shared
    token (``student_ids`` ``[R, K]``, the student's id of each; -1 marks an absent bucket) and one for the rest
    of each vocabulary. ``lp_buckets`` ``[R, K]`` are the teacher's log-probs of those tokens (-inf where
    absent), ``lp_rest`` ``[R]`` the log of the teacher's remaining mass. Returns the value ``[R]`` and its
    gradient with respect to the student's (tempered) logits ``[R, V]`` (None unless ``want_grad``)."""
    R, V = shifted.shape
    K = student_ids.shape[-1]
    ext = torch.cat([shifted, shifted.new_full((R, 1), float("-inf"))], dim=-1)  # column V: absent buckets
    idx = torch.where(student_ids >= 0, student_ids, V)
    lq_b = ext.gather(-1, idx) - lse
    rest = torch.logsumexp(ext.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)  # unnormalised
    lq = torch.cat([lq_b, rest - lse], dim=-1)
    lp = torch.cat([lp_buckets, lp_rest.unsqueeze(-1)], dim=-1)
    value, qg = divergence_value_and_grad("jsd", lq, lp, guard=True, want_grad=want_grad, beta=beta)
    if not want_grad:
        return value, None
    assert qg is not None
    s = qg.sum(-1, keepdim=True)
    has_rest = torch.isfinite(rest)
    coef = torch.where(has_rest, qg[:, K:], torch.zeros_like(rest))
    # a token in the rest bucket: (q_v / q_rest) qg_rest; a shared token: its own qg; then - q sum(qg)
    g = torch.exp(ext - torch.where(has_rest, rest, lse)).mul_(coef)
    g.scatter_(-1, idx, qg[:, :K])
    g = g[:, :V]
    g.sub_((shifted - lse).exp_().mul_(s))
    return value, g


def _label_logprob(shifted: Tensor, lse: Tensor, labels: Tensor) -> Tensor:
    return (shifted.gather(-1, labels.unsqueeze(-1)) - lse).squeeze(-1)


def _add_onehot(grad: Tensor, q: Tensor, labels: Tensor, w: Tensor) -> None:
    """grad += w (q - onehot(label)), the gradient of ``-w log q(label)`` (w ``[C]``, constant)."""
    grad.add_(q * w.unsqueeze(-1))
    grad.scatter_add_(-1, labels.unsqueeze(-1), -w.unsqueeze(-1))


def _cross_rows(chunk: ObjectiveChunk) -> tuple[Tensor, Tensor, Tensor]:
    """(paired, matched, span_logprob) ``[C]``; without ``cross`` (the same tokenizer) every position is paired and
    matched."""
    C = chunk.labels.shape[0]
    if chunk.cross is None:
        ones = torch.ones(C, dtype=torch.bool, device=chunk.labels.device)
        return ones, ones, torch.full((C,), float("-inf"), device=chunk.labels.device)
    return chunk.cross.paired, chunk.cross.matched, chunk.cross.span_logprob


def _check_weights(*names: str, unit: tuple[str, ...] = ()) -> Callable[[dict[str, Any]], None]:
    def check(params: dict[str, Any]) -> None:
        for name in names + unit:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or not float(v) >= 0.0:
                raise UserError(f"{name} must be a number >= 0, got {v!r}")
            if name in unit and float(v) > 1.0:
                raise UserError(f"{name} must be in [0, 1], got {v!r}")
            params[name] = float(v)
        if not any(params[n] > 0 for n in names):
            raise UserError(f"at least one of {', '.join(names)} must be positive (the loss would be 0)")

    return check


# ------------------------------------------------------------------------------------------------------------
# The objectives
# ------------------------------------------------------------------------------------------------------------


def _add_uld_rows(chunk: ObjectiveChunk, t: Tensor | None, rows: Tensor, shifted: Tensor, lse: Tensor,
                  q: Tensor | None, grad: Tensor | None, value: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """``weight`` x the ULD distance of ``rows`` added to ``value``, and (when ``grad`` is given) its gradient with
    respect to the student's logits (through the softmax ``q``) added to ``grad``; returns the new value and the sum
    of the distances."""
    p_sorted, p_tail = sorted_teacher_probs(chunk, t, rows)
    d, g = uld_distance(shifted[rows], lse[rows], p_sorted, p_tail, grad is not None)
    value = value.index_add(0, rows, d * weight)
    if grad is not None:
        assert g is not None and q is not None
        qr = q[rows]
        g.sub_((qr * g).sum(-1, keepdim=True)).mul_(qr)
        grad.index_add_(0, rows, g.mul_(weight))
    return value, d.sum()


@register_objective("uld", signals=("dense", "topk"), needs_labels=True, returns_grad=True, cross_vocab=True,
                    validate=_check_weights("ce_weight", "uld_weight"))
def uld(chunk: ObjectiveChunk, *, ce_weight: float = 1.0, uld_weight: float = 1.5) -> ChunkResult:
    """Universal Logit Distillation: CE on the text + the distance between sorted probability vectors (any two
    vocabularies)."""
    T = chunk.temperature
    want = chunk.needs_grad
    labels = chunk.labels
    paired, _, _ = _cross_rows(chunk)
    z, t = chunk.take_logits()
    shifted, lse = shifted_lse(z)
    del z
    C = labels.shape[0]
    value = -_label_logprob(shifted, lse, labels) * ce_weight
    q = grad = None
    if want:
        q = (shifted - lse).exp()
        grad = torch.zeros_like(q)
        if ce_weight > 0:
            _add_onehot(grad, q, labels, torch.full((C,), ce_weight, dtype=q.dtype, device=q.device))
    rows = paired.nonzero().squeeze(-1)
    dist_sum = torch.zeros((), dtype=shifted.dtype, device=shifted.device)
    if rows.numel() and uld_weight > 0:
        value, dist_sum = _add_uld_rows(chunk, t, rows, shifted, lse, q, grad, value, uld_weight)
    metrics: Metrics = {"uld/distance": (dist_sum, paired.sum().to(dist_sum.dtype)),
                        "uld/paired_frac": (paired.sum().to(dist_sum.dtype), float(C))}
    if want:
        assert grad is not None
        if T != 1.0:
            grad.div_(T)
    return ChunkResult(loss=value, grad=grad, metrics=metrics)


def _matched_buckets(chunk: ObjectiveChunk, t: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For ``rows`` of the chunk: the student ids of the shared buckets ``[R, K]`` (-1: absent), the teacher's
    log-probs of them ``[R, K]`` and of the rest ``[R]``."""
    V = chunk.vocab_size
    if chunk.cross is not None:
        vmap = chunk.cross.vocab_map
    else:
        vt = t.shape[-1] if t is not None else V
        if vt != V:
            raise UserError(f"objective 'aligned': the teacher has {vt} tokens and the student {V}, and the signal "
                            "carries no vocabulary map (cross) to pair them: build the signal with "
                            "distillarena.teachers.cross")
        vmap = torch.arange(V, device=chunk.labels.device)
    R = rows.numel()
    if chunk.teacher_kind == "dense":
        assert t is not None
        lp_t = F.log_softmax(t[rows], dim=-1)
        t_ids = (vmap >= 0).nonzero().squeeze(-1)
        s_ids = vmap[t_ids].unsqueeze(0).expand(R, -1)
        lp_b = lp_t[:, t_ids]
        lp_rest = torch.logsumexp(lp_t.index_fill(-1, t_ids, float("-inf")), dim=-1)
        return s_ids, lp_b, lp_rest
    assert chunk.topk_ids is not None and chunk.topk_logprobs is not None and chunk.tail_logprob is not None
    ids, lps, tail = chunk.topk_ids[rows], chunk.topk_logprobs[rows], chunk.tail_logprob[rows]
    if chunk.cross is None and ids.numel() and int(ids.max()) >= V:
        raise UserError(f"objective 'aligned': top-k id {int(ids.max())} is outside the student's vocabulary of {V} "
                        "and the signal carries no vocabulary map (cross) to read it through")
    s_ids = vmap[ids]
    mapped = s_ids >= 0
    neg = torch.full_like(lps, float("-inf"))
    lp_b = torch.where(mapped, lps, neg)
    lp_rest = torch.logaddexp(tail, torch.logsumexp(torch.where(mapped, neg, lps), dim=-1))
    return torch.where(mapped, s_ids, -1), lp_b, lp_rest


@register_objective("aligned", signals=("dense", "topk"), needs_labels=True, returns_grad=True, cross_vocab=True,
                    validate=_check_weights("uld_weight", "merged_weight", "ce_weight", unit=("beta",)))
def aligned(chunk: ObjectiveChunk, *, beta: float = 0.0, uld_weight: float = 0.0, merged_weight: float = 1.0,
            ce_weight: float = 0.0) -> ChunkResult:
    """Aligned-span distillation: KL (JSD beta) over shared token strings on one-to-one spans; the merged span
    probability (and/or ULD) elsewhere."""
    T = chunk.temperature
    want = chunk.needs_grad
    labels = chunk.labels
    C = labels.shape[0]
    paired, matched, span_lp = _cross_rows(chunk)
    z, t = chunk.take_logits()
    shifted, lse = shifted_lse(z)
    del z
    lq_label = _label_logprob(shifted, lse, labels)
    value = -lq_label * ce_weight
    q = grad = None
    if want:
        q = (shifted - lse).exp()
        grad = torch.zeros_like(q)
    onehot_w = torch.full((C,), ce_weight, dtype=shifted.dtype, device=shifted.device)
    zero = torch.zeros((), dtype=shifted.dtype, device=shifted.device)
    div_sum = uld_sum = zero

    rows = matched.nonzero().squeeze(-1)
    if rows.numel():
        s_ids, lp_b, lp_rest = _matched_buckets(chunk, t, rows)
        d, g = shared_bucket_divergence(shifted[rows], lse[rows], s_ids, lp_b, lp_rest, beta, want)
        value = value.index_add(0, rows, d)
        div_sum = d.sum()
        if want:
            assert grad is not None and g is not None
            grad.index_add_(0, rows, g)

    other = paired & ~matched
    rows = other.nonzero().squeeze(-1)
    if rows.numel() and uld_weight > 0:
        value, uld_sum = _add_uld_rows(chunk, t, rows, shifted, lse, q, grad, value, uld_weight)
    if merged_weight > 0:
        w = torch.where(other, span_lp.exp(), zero) * merged_weight
        value = value - w * lq_label
        onehot_w = onehot_w + w
    if want:
        assert grad is not None and q is not None
        if bool((onehot_w != 0).any()):
            _add_onehot(grad, q, labels, onehot_w)
        if T != 1.0:
            grad.div_(T)
    n_other = other.sum().to(shifted.dtype)
    metrics: Metrics = {
        "aligned/matched_frac": (matched.sum().to(shifted.dtype), float(C)),
        "aligned/unmatched_frac": (n_other, float(C)),
        "aligned/matched_divergence": (div_sum, matched.sum().to(shifted.dtype)),
        "aligned/unmatched_uld": (uld_sum, n_other),
    }
    return ChunkResult(loss=value, grad=grad, metrics=metrics)
