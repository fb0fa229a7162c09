r"""One-hot estimators of the unified view, and Hybrid Policy Distillation (HPD).

The unified view (HPD paper, Eq. 9): knowledge distillation as a token-weighted log-likelihood,
``L = -w(a|s) * log q(a|s)`` with ``w`` a stop-gradient weight. Its gradient with respect to the student
logits is ``-w * (onehot(a) - q)`` (divided by the loss temperature). The weights, evaluated at the label
token ``a* = a`` (``p``: teacher probability, ``q``: student probability, both at the loss temperature):

- sft:        w = 1. Needs no teacher (any signal is ignored).
- seqkd:      w = p(a*), one-hot forward KL. Needs p(a*): a dense or token_logprobs signal.
- rkl_onehot: w = k1 = q(a*) (log p(a*) - log q(a*)), one-hot reverse KL. Same signals.
- jsd_onehot: w = (1-beta) q(a*) (log M(a*) - log q(a*)), M = beta p + (1-beta) q. Same signals.

These are the paper's baselines "as run" (Sec. 5.1): its estimators ``q (log q - log p)`` and
``1/2 q (log q - log((p+q)/2))`` are per-token divergence contributions, and the weight is their negative;
with the same beta convention as :mod:`~distillarena.objectives.divergences` (beta = 0.5 gives the paper's 1/2
and M = (p+q)/2).

HPD (Sec. 4.2, Eqs. 11-15, Algorithm 1; as in the authors' LlamaFactory code), per valid position with
label ``a*``:

1. expert gap ``k1 = q(a*) (log p(a*) - log q(a*))``;
2. one student sample ``a ~ q(.|s)`` at temperature 1 (``sample_temperature``), drawn from the same logits,
   unless ``sampled_ids`` is given; its gap ``k1' = q(a) (log p(a) - log q(a))``;
3. expert weight ``w*``: ``2 p(a*) + k1`` if ``k1 > 0`` and ``k1' < 0`` and ``a != a*`` (the *Reinforce*
   branch: mass suppressed on the sample goes to the expert token); ``k1`` if ``k1 <= 0`` (the *mask*: the
   forward term is dropped and the weight is negative, reverse-KL-like suppression of an over-estimated
   expert token); ``p(a*) + k1`` otherwise (forward-KL-like). At ``k1 == 0`` exactly this gives 0 (Eq. 12
   and the LlamaFactory code; the verl code gives ``p``);
4. sampled-token weight ``w_hat = 1[a != a*] 1[k1' < 0] k1'``: the sample is only ever suppressed, never
   reinforced, and gets no weight when it equals the label;
5. loss ``-w* log q(a*) - w_hat log q(a)``, both weights stop-gradient (``p`` and ``q`` inside the weights are
   detached). No CE term and no temperature in the paper (here the loss temperature applies to p and q,
   default 1).

(The code checks ``k1' < 0`` for Reinforce without ``a != a*``; the two agree because ``a == a*`` implies
``k1' == k1``. Here ``a != a*`` is required explicitly, which matters only for token_logprobs signals whose
two log-probs for the same token disagree.) Ablations: ``reinforce=False`` drops the ``+p(a*)`` Reinforce
term; ``use_sample=False`` drops the sample entirely (no ``w_hat``, no Reinforce).

Diagnostics (``metrics``): ``hpd/masked_frac`` (share of positions with ``k1 <= 0``), ``hpd/reinforce_frac``,
``hpd/sample_active_frac`` (share with a non-zero ``w_hat``), ``hpd/sample_differs_frac``,
``hpd/k1_expert_mean``, ``hpd/k1_sample_mean`` (over positions whose sample differs from the label, as the
authors log it), ``hpd/w_expert_mean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives.engine import ChunkResult, ObjectiveChunk, token_logprobs
from distillarena.objectives.registry import register_objective
from distillarena.objectives.signals import IGNORE_INDEX, LMHeadInput, TeacherSignal, head_logits, topk_token_logprobs

__all__ = ["HPDWeights", "hpd_weights", "onehot_weight", "sample_tokens"]


def _teacher_token_logprobs(chunk: ObjectiveChunk, t: Tensor | None, ids: list[Tensor]) -> list[Tensor]:
    """Teacher log-probs of the given token ids [C] each, from dense logits (t, already / T)."""
    assert chunk.teacher_kind == "dense" and t is not None
    out = token_logprobs(t, torch.stack(ids, dim=-1))
    return list(out.unbind(-1))


def onehot_weight(name: str, lq: Tensor, lp: Tensor | None, *, beta: float = 0.5) -> Tensor:
    """The unified-view weight w for a one-hot estimator, from the student and teacher log-probs of the
    token."""
    if name == "sft":
        return torch.ones_like(lq)
    assert lp is not None
    if name == "seqkd":
        return lp.exp()
    if name == "rkl_onehot":
        return lq.exp() * (lp - lq)
    if name == "jsd_onehot":
        if beta <= 0.0 or beta >= 1.0:
            return torch.zeros_like(lq)
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        return (1.0 - beta) * lq.exp() * (lm - lq)
    raise ValueError(f"unknown one-hot estimator {name!r}")


def _onehot_grad(lq: Tensor, terms: list[tuple[Tensor, Tensor]], T: float) -> Tensor:
    """Gradient of sum_i -w_i log q(a_i) w.r.t. raw logits: sum_i w_i (q - onehot(a_i)) / T. Consumes lq."""
    wsum = terms[0][0].clone()
    for w, _ in terms[1:]:
        wsum += w
    grad = lq.exp_().mul_(wsum.unsqueeze(-1))
    for w, a in terms:
        grad.scatter_add_(-1, a.unsqueeze(-1), -w.unsqueeze(-1))
    if T != 1.0:
        grad.div_(T)
    return grad


def _onehot(chunk: ObjectiveChunk, name: str, beta: float = 0.5) -> ChunkResult:
    labels = chunk.labels
    z, t = chunk.take_logits()
    lq = F.log_softmax(z, dim=-1)
    del z
    lq_a = lq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp_a = None
    if name != "sft":
        if chunk.teacher_kind == "token_logprobs":
            lp_a = chunk.label_logprobs
        else:
            (lp_a,) = _teacher_token_logprobs(chunk, t, [labels])
    del t
    w = onehot_weight(name, lq_a, lp_a, beta=beta)
    value = -w * lq_a
    metrics: dict[str, tuple[Tensor | float, Tensor | float]] = {f"{name}/weight_mean": (w.sum(), float(w.numel()))}
    if not chunk.needs_grad:
        return ChunkResult(loss=value, metrics=metrics)
    return ChunkResult(loss=value, grad=_onehot_grad(lq, [(w, labels)], chunk.temperature), metrics=metrics)


def _check_beta(params: dict[str, Any]) -> None:
    b = params["beta"]
    if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= float(b) <= 1.0:
        raise UserError(f"beta must be in [0, 1], got {b!r}")


_TOKEN = ("dense", "token_logprobs")


@register_objective("sft", signals=("dense", "topk", "token_logprobs", "none"), needs_labels=True, returns_grad=True,
                    uses_teacher=False)
def sft(chunk: ObjectiveChunk) -> ChunkResult:
    """SFT / cross-entropy on the label token (w = 1); the teacher signal, if any, is ignored."""
    return _onehot(chunk, "sft")


@register_objective("seqkd", signals=_TOKEN, needs_labels=True, returns_grad=True)
def seqkd(chunk: ObjectiveChunk) -> ChunkResult:
    """One-hot forward KL on the label token, w = p_T(a*) (the paper's SeqKD baseline)."""
    return _onehot(chunk, "seqkd")


@register_objective("rkl_onehot", signals=_TOKEN, needs_labels=True, returns_grad=True)
def rkl_onehot(chunk: ObjectiveChunk) -> ChunkResult:
    """One-hot reverse KL on the label token, w = k1 = q(a*)(log p(a*) - log q(a*)) (the RKLD baseline)."""
    return _onehot(chunk, "rkl_onehot")


@register_objective("jsd_onehot", signals=_TOKEN, needs_labels=True, returns_grad=True, validate=_check_beta)
def jsd_onehot(chunk: ObjectiveChunk, *, beta: float = 0.5) -> ChunkResult:
    """One-hot JSD(beta) on the label token, w = (1-beta) q(a*)(log M(a*) - log q(a*)) (the JSD baseline)."""
    return _onehot(chunk, "jsd_onehot", float(beta))


# ------------------------------------------------------------------------------------------------------------
# HPD
# ------------------------------------------------------------------------------------------------------------


@dataclass
class HPDWeights:
    """HPD's per-position weights and the quantities behind them (all detached, shape [C])."""

    w_expert: Tensor
    w_sample: Tensor
    k1: Tensor
    k1_sample: Tensor | None
    masked: Tensor  # k1 <= 0
    reinforced: Tensor  # Reinforce branch taken
    sample_active: Tensor  # w_sample != 0 branch (a != a*, k1' < 0)


def hpd_weights(
    lq_expert: Tensor,
    lp_expert: Tensor,
    lq_sample: Tensor | None = None,
    lp_sample: Tensor | None = None,
    sample_differs: Tensor | None = None,
    *,
    reinforce: bool = True,
) -> HPDWeights:
    """HPD's expert and sampled-token weights (Eqs. 13-14) from student/teacher log-probs of the expert
    (label) token and of the sampled token. Without a sample (``lq_sample is None``) this is Eq. 12: no
    Reinforce term and
    ``w_sample = 0``."""
    lq_expert, lp_expert = lq_expert.detach(), lp_expert.detach()
    p_e = lp_expert.exp()
    k1 = lq_expert.exp() * (lp_expert - lq_expert)
    masked = k1 <= 0
    w_e = torch.where(masked, k1, p_e + k1)
    zero = torch.zeros_like(k1)
    if lq_sample is None:
        f = torch.zeros_like(masked)
        return HPDWeights(w_e, zero, k1, None, masked, f, f)
    assert lp_sample is not None and sample_differs is not None
    lq_sample, lp_sample = lq_sample.detach(), lp_sample.detach()
    k1s = lq_sample.exp() * (lp_sample - lq_sample)
    active = sample_differs & (k1s < 0)
    reinforced = active & ~masked if reinforce else torch.zeros_like(masked)
    w_e = w_e + torch.where(reinforced, p_e, zero)
    w_s = torch.where(active, k1s, zero)
    return HPDWeights(w_e, w_s, k1, k1s, masked, reinforced, active)


def sample_tokens(logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from softmax(logits / temperature), by inverse CDF (never raises on a bad row)."""
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    cdf = probs.cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return ids.squeeze(-1).clamp_(0, logits.shape[-1] - 1)


def _check_hpd(params: dict[str, Any]) -> None:
    st = params["sample_temperature"]
    if not isinstance(st, int | float) or not (math.isfinite(st) and st > 0):
        raise UserError(f"sample_temperature must be a positive number, got {st!r}")


def hpd_signal_from_topk(student: LMHeadInput | Tensor, signal: TeacherSignal, labels: Tensor,
                         gen: torch.Generator, params: dict[str, Any]) -> TeacherSignal:
    """HPD needs the teacher's log-prob of the label and of one student sample per position; a top-k signal
    has them inside the top k, and the tail mass shared uniformly over the rest of the vocabulary outside it
    (an approximation, documented). The sample is drawn here with the same per-micro-batch generator."""
    params.pop("sampled_ids", None)
    use_sample = params.get("use_sample", True)
    t_sample = float(params.get("sample_temperature", 1.0))
    valid = labels != IGNORE_INDEX
    vocab = student.vocab_size if isinstance(student, LMHeadInput) else int(student.shape[-1])
    ids, lps, tail = signal.topk_ids[valid], signal.topk_logprobs[valid], signal.tail_logprob[valid]
    label_lp = torch.zeros(labels.shape, device=labels.device)
    label_lp[valid] = topk_token_logprobs(ids, lps, tail, labels[valid], vocab)
    if not use_sample:
        return TeacherSignal.token_logprobs(label_lp)
    with torch.no_grad():
        h = student.hidden[valid].detach() if isinstance(student, LMHeadInput) else student[valid].detach()
        rows = max(1, (1 << 22) // vocab)
        draws = []
        for c0 in range(0, h.shape[0], rows):
            z = head_logits(student, h[c0:c0 + rows]) if isinstance(student, LMHeadInput) else (
                h[c0:c0 + rows].float())
            draws.append(torch.multinomial(torch.softmax(z / t_sample, -1), 1, generator=gen).squeeze(-1))
        s = torch.cat(draws) if draws else torch.zeros(0, dtype=torch.long, device=labels.device)
    sampled = torch.zeros_like(labels)
    sampled[valid] = s
    sampled_lp = torch.zeros(labels.shape, device=labels.device)
    sampled_lp[valid] = topk_token_logprobs(ids, lps, tail, s, vocab)
    return TeacherSignal.token_logprobs(label_lp, sampled, sampled_lp)


@register_objective(
    "hpd",
    signals=("dense", "token_logprobs"),
    needs_labels=True,
    returns_grad=True,
    per_position=("sampled_ids",),
    validate=_check_hpd,
    prepare_signal=hpd_signal_from_topk,
    adapts=("topk",),
)
def hpd(
    chunk: ObjectiveChunk,
    *,
    sampled_ids: Tensor | None = None,
    reinforce: bool = True,
    use_sample: bool = True,
    sample_temperature: float = 1.0,
) -> ChunkResult:
    """Hybrid Policy Distillation: masked/reinforced expert-token weight plus a suppressive student-sample
    term."""
    labels = chunk.labels
    given = chunk.extras.get("sampled_ids")
    s: Tensor | None = None
    if use_sample:
        if chunk.teacher_kind == "token_logprobs":
            if given is not None:
                raise UserError(
                    "hpd: with a token_logprobs teacher signal the sampled tokens come from the signal "
                    "(TeacherSignal.token_logprobs(..., sampled_ids, sampled_logprobs)); do not also pass "
                    "sampled_ids"
                )
            if chunk.sampled_ids is None:
                raise UserError(
                    "hpd needs the teacher's log-prob of one student sample per position: build the signal "
                    "with TeacherSignal.token_logprobs(label_logprobs, sampled_ids, sampled_logprobs), or "
                    "pass use_sample=False (the no-sampling ablation)"
                )
            s = chunk.sampled_ids
        elif given is not None:
            s = given.to(torch.long)
            bad = (s < 0) | (s >= chunk.vocab_size)
            if bool(bad.any()):
                where = chunk.describe(int(bad.nonzero()[0, 0]))
                raise UserError(f"hpd: sampled_ids at {where} is outside the vocabulary [0, {chunk.vocab_size})")
        else:
            assert chunk.raw_logits is not None
            with torch.no_grad():
                s = sample_tokens(chunk.raw_logits.detach(), sample_temperature, chunk.generator)

    z, t = chunk.take_logits()
    lq = F.log_softmax(z, dim=-1)
    del z
    lq_e = lq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lq_s = lp_s = differs = None
    if chunk.teacher_kind == "token_logprobs":
        lp_e = chunk.label_logprobs
        lp_s = chunk.sampled_logprobs
        assert lp_e is not None
    else:
        tok = [labels] if s is None else [labels, s]
        lps = _teacher_token_logprobs(chunk, t, tok)
        lp_e = lps[0]
        lp_s = lps[1] if s is not None else None
    del t
    if s is not None:
        lq_s = lq.gather(-1, s.unsqueeze(-1)).squeeze(-1)
        differs = s != labels
    w = hpd_weights(lq_e, lp_e, lq_s, lp_s, differs, reinforce=reinforce)
    value = -w.w_expert * lq_e
    terms = [(w.w_expert, labels)]
    if s is not None:
        assert lq_s is not None
        value = value - w.w_sample * lq_s
        terms.append((w.w_sample, s))

    C = float(labels.numel())
    f = lq.dtype
    metrics: dict[str, tuple[Tensor | float, Tensor | float]] = {
        "hpd/masked_frac": (w.masked.to(f).sum(), C),
        "hpd/reinforce_frac": (w.reinforced.to(f).sum(), C),
        "hpd/sample_active_frac": (w.sample_active.to(f).sum(), C),
        "hpd/k1_expert_mean": (w.k1.sum(), C),
        "hpd/w_expert_mean": (w.w_expert.sum(), C),
    }
    if s is not None:
        assert differs is not None and w.k1_sample is not None
        dif = differs.to(f)
        metrics["hpd/sample_differs_frac"] = (dif.sum(), C)
        metrics["hpd/k1_sample_mean"] = ((w.k1_sample * dif).sum(), dif.sum())
    if not chunk.needs_grad:
        return ChunkResult(loss=value, metrics=metrics)
    return ChunkResult(loss=value, grad=_onehot_grad(lq, terms, chunk.temperature), metrics=metrics)
