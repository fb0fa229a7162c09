"""Reference implementations for the objectives tests, written straight from the definitions (no tests here).

They work on full ``[N, V]`` logits of any dtype and are differentiable with autograd, so they serve both as the
float64 ground truth and as the "naive path" (float32 autograd over full logits) that the chunked and fused paths
must reproduce. AKL's head/tail split and HPD's branches are written per position with Python control flow,
independently of the library's vectorised code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALL = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "sft", "seqkd", "rkl_onehot", "jsd_onehot", "hpd")
DIVS = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl")
ONEHOT = ("sft", "seqkd", "rkl_onehot", "jsd_onehot")


def _kl_terms(x: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """sum_v x_v (log x_v - log y_v) with the convention 0 log 0 = 0."""
    return torch.where(x > 0, x * (lx - ly), torch.zeros_like(x)).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, wa: float) -> Tensor:
    """log(wa * a + (1 - wa) * b)."""
    if wa == 0:
        return lb
    if wa == 1:
        return la
    return torch.logaddexp(la + math.log(wa), lb + math.log(1 - wa))


def akl_ratios(p: Tensor, q: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """Per position: sort p descending; head = prefix with inclusive cumulative mass <= mu, plus the top-1."""
    rh, rt = [], []
    for i in range(p.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda v: -float(p[i, v]))
        cum, e_head, e_tail = 0.0, 0.0, 0.0
        for rank, v in enumerate(order):
            cum += float(p[i, v])
            err = abs(float(p[i, v]) - float(q[i, v]))
            if rank == 0 or cum <= mu:
                e_head += err
            else:
                e_tail += err
        tot = e_head + e_tail
        rh.append(e_head / tot if tot > 0 else 0.5)
        rt.append(e_tail / tot if tot > 0 else 0.5)
    return torch.tensor(rh, dtype=p.dtype), torch.tensor(rt, dtype=p.dtype)


def hpd_reference_weights(
    lq_e: float, lp_e: float, lq_s: float | None, lp_s: float | None, differs: bool, reinforce: bool = True
) -> tuple[float, float]:
    """HPD's (w_expert, w_sample) for one position, from Eqs. 13-14 / the authors' code."""
    k1 = math.exp(lq_e) * (lp_e - lq_e)
    p_e = math.exp(lp_e)
    if lq_s is None:
        return (p_e + k1 if k1 > 0 else k1), 0.0
    assert lp_s is not None
    k1s = math.exp(lq_s) * (lp_s - lq_s)
    if k1 <= 0:
        w_e = k1  # the mask
    elif k1s < 0 and differs and reinforce:
        w_e = 2 * p_e + k1  # Reinforce
    else:
        w_e = p_e + k1
    w_s = k1s if (differs and k1s < 0) else 0.0
    return w_e, w_s


def onehot_reference_weight(name: str, lq: float, lp: float, beta: float = 0.5) -> float:
    q, p = math.exp(lq), math.exp(lp)
    if name == "sft":
        return 1.0
    if name == "seqkd":
        return p
    if name == "rkl_onehot":
        return q * (lp - lq)
    if name == "jsd_onehot":
        m = beta * p + (1 - beta) * q
        return (1 - beta) * q * (math.log(m) - lq) if m > 0 else 0.0
    raise ValueError(name)


def reference_losses(
    name: str,
    s: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    sampled_ids: Tensor | None = None,
    **params: float,
) -> Tensor:
    """Per-position loss [N] (ignored positions included; callers select the valid ones)."""
    T = temperature
    lq = torch.log_softmax(s / T, dim=-1)
    lp = torch.log_softmax(t.to(s.dtype) / T, dim=-1)
    q, p = lq.exp(), lp.exp()
    if name == "fkl":
        return _kl_terms(p, lp, lq)
    if name == "rkl":
        return _kl_terms(q, lq, lp)
    if name == "jsd":
        b = params.get("beta", 0.5)
        if b == 0:
            return _kl_terms(p, lp, lq)
        if b == 1:
            return _kl_terms(q, lq, lp)
        lm = _log_mix(lp, lq, b)
        out = b * _kl_terms(p, lp, lm) + (1 - b) * _kl_terms(q, lq, lm)
        return out / (b * (1 - b)) if params.get("unscaled", False) else out
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        return _kl_terms(p, lp, _log_mix(lp, lq, params.get("alpha", 0.1)))
    if name == "srkl":
        return _kl_terms(q, lq, _log_mix(lq, lp, params.get("alpha", 0.1)))
    if name == "akl":
        with torch.no_grad():
            rh, rt = akl_ratios(p.detach(), q.detach(), params.get("mu", 0.5))
        return rh * _kl_terms(p, lp, lq) + rt * _kl_terms(q, lq, lp)
    assert labels is not None
    lab = labels.clamp(min=0)
    lq_a = lq.gather(-1, lab[:, None]).squeeze(-1)
    lp_a = lp.gather(-1, lab[:, None]).squeeze(-1)
    if name in ONEHOT:
        w = torch.tensor(
            [
                onehot_reference_weight(name, float(a), float(b), params.get("beta", 0.5))
                for a, b in zip(lq_a.detach(), lp_a.detach(), strict=True)
            ],
            dtype=s.dtype,
        )
        return -w * lq_a
    if name == "hpd":
        use_sample = params.get("use_sample", True)
        reinforce = params.get("reinforce", True)
        out = []
        lqd, lpd = lq.detach(), lp.detach()
        for i in range(s.shape[0]):
            a = int(lab[i])
            if use_sample:
                assert sampled_ids is not None
                b = int(sampled_ids[i])
                we, ws = hpd_reference_weights(
                    float(lqd[i, a]), float(lpd[i, a]), float(lqd[i, b]), float(lpd[i, b]), a != b, reinforce
                )
                out.append(-we * lq[i, a] - ws * lq[i, b])
            else:
                we, _ = hpd_reference_weights(float(lqd[i, a]), float(lpd[i, a]), None, None, False)
                out.append(-we * lq[i, a])
        return torch.stack(out)
    raise ValueError(name)


def reference_sum(name: str, s: Tensor, t: Tensor, labels: Tensor | None = None, **kw: float) -> Tensor:
    per = reference_losses(name, s, t, labels, **kw)
    if labels is None:
        return per.sum()
    return per[labels != -100].sum()


def rel_err(a: Tensor, b: Tensor) -> float:
    """Norm-wise relative error ||a - b|| / max(||b||, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
