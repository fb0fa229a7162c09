"""Reference implementations for the cross-tokenizer objectives' tests, written from the definitions (no tests here).

Float64, full distributions, per position with Python loops where it keeps them obviously right; differentiable
with autograd (sort's values are), so they give both the value and the gradient to compare with."""

from __future__ import annotations

import torch
from torch import Tensor


def _jsd(p: Tensor, q: Tensor, beta: float) -> Tensor:
    """Generalized JSD(beta) of two probability vectors (TRL convention; 0 log 0 = 0)."""

    def kl(x: Tensor, y: Tensor) -> Tensor:
        return torch.where(x > 0, x * (torch.log(x) - torch.log(y)), torch.zeros_like(x)).sum()

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def sorted_distance(q: Tensor, p: Tensor) -> Tensor:
    """sum_r |q_(r) - p_(r)|, both sorted decreasingly, the shorter padded with zeros."""
    qs = torch.sort(q, descending=True).values
    ps = torch.sort(p, descending=True).values
    n = max(qs.numel(), ps.numel())
    qs = torch.cat([qs, qs.new_zeros(n - qs.numel())])
    ps = torch.cat([ps, ps.new_zeros(n - ps.numel())])
    return (qs - ps).abs().sum()


def sorted_distance_topk(q: Tensor, p_top: Tensor, p_tail: Tensor) -> Tensor:
    """The (k+1)-bucket version: the k largest of each, then the rest of each as one bucket."""
    k = p_top.numel()
    qs = torch.sort(q, descending=True).values
    q_top = qs[:k]
    if q_top.numel() < k:
        q_top = torch.cat([q_top, q_top.new_zeros(k - q_top.numel())])
    ps = torch.sort(p_top, descending=True).values
    return (q_top - ps).abs().sum() + (qs[k:].sum() - p_tail).abs()


def uld_losses(s: Tensor, t: Tensor, labels: Tensor, paired: Tensor, *, T: float = 1.0, ce_weight: float = 1.0,
               uld_weight: float = 1.5) -> Tensor:
    """Per valid position: ce_weight * CE + uld_weight * sorted distance (paired positions); s [N, Vs], t [N, Vt]."""
    out = []
    for i in range(s.shape[0]):
        if int(labels[i]) == -100:
            continue
        q = torch.softmax(s[i] / T, -1)
        loss = -torch.log(q[int(labels[i])]) * ce_weight
        if bool(paired[i]):
            loss = loss + uld_weight * sorted_distance(q, torch.softmax(t[i] / T, -1))
        out.append(loss)
    return torch.stack(out)


def shared_bucket_jsd(q: Tensor, p: Tensor, vocab_map: Tensor, beta: float) -> Tensor:
    """JSD over the shared tokens (teacher id j -> student id vocab_map[j]) plus one bucket for the rest."""
    t_ids = [j for j in range(p.numel()) if int(vocab_map[j]) >= 0]
    s_ids = [int(vocab_map[j]) for j in t_ids]
    pb = torch.stack([p[j] for j in t_ids]) if t_ids else p.new_zeros(0)
    qb = torch.stack([q[v] for v in s_ids]) if s_ids else q.new_zeros(0)
    p_rest = p.sum() - pb.sum()
    q_rest = q.sum() - qb.sum()
    return _jsd(torch.cat([pb, p_rest.clamp(min=0)[None]]), torch.cat([qb, q_rest.clamp(min=0)[None]]), beta)


def aligned_losses(s: Tensor, t: Tensor, labels: Tensor, paired: Tensor, matched: Tensor, span_logprob: Tensor,
                   vocab_map: Tensor, *, T: float = 1.0, beta: float = 0.5, uld_weight: float = 1.0,
                   merged_weight: float = 0.0, ce_weight: float = 0.0) -> Tensor:
    out = []
    for i in range(s.shape[0]):
        a = int(labels[i])
        if a == -100:
            continue
        q = torch.softmax(s[i] / T, -1)
        p = torch.softmax(t[i] / T, -1)
        loss = -torch.log(q[a]) * ce_weight
        if bool(matched[i]) and bool(paired[i]):
            loss = loss + shared_bucket_jsd(q, p, vocab_map, beta)
        elif bool(paired[i]):
            loss = loss + uld_weight * sorted_distance(q, p)
            loss = loss - merged_weight * torch.exp(span_logprob[i]) * torch.log(q[a])
        out.append(loss)
    return torch.stack(out)
