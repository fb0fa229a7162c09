"""distillarena.objectives: the math. Every objective against a float64 reference written from its definition,
finite-difference gradients, the one-hot gradient identity, HPD's branches, TRL's generalized JSD semantics,
top-k and token-log-prob signals, and property-based invariants."""

from __future__ import annotations

import math

import pytest
import test_objectives_reference as ref  # noqa: E402 - tests/ is on sys.path (pytest rootdir import)
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distillarena.core.errors import UserError
from distillarena.objectives import (
    TeacherSignal,
    available_objectives,
    compute_objective,
    generalized_jsd_loss,
    hpd_loss,
    hpd_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
D64 = torch.float64


def _data(n: int, v: int, case: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=D64) * 2
    t = torch.randn(n, v, generator=g, dtype=D64) * 2
    if case == "extreme":
        # +-1e4 logits: near one-hot distributions, probabilities that underflow to exactly 0 in float32/64
        for x in (s, t):
            m = torch.rand(n, v, generator=g) < 0.3
            big = torch.where(torch.rand(n, v, generator=g) < 0.5, -1e4, 1e4).to(D64)
            x[m] = big[m]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100  # padded / masked positions
    labels[0] = 3 % v  # at least one valid
    return s, t, labels


def _params(name: str) -> dict:
    return {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "jsd_onehot": {"beta": 0.4}}.get(
        name, {}
    )


def _sampled(n: int, v: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,temperature", [("random", 1.0), ("random", 2.5), ("extreme", 1.0), ("extreme", 0.7)])
@pytest.mark.parametrize("name", ref.ALL)
def test_matches_float64_reference(name: str, case: str, temperature: float) -> None:
    n, v = 24, 37
    s, t, labels = _data(n, v, case)
    kw = dict(_params(name))
    extra = {}
    if name == "hpd":
        extra["sampled_ids"] = _sampled(n, v)
    # reference in float64, with autograd
    s64 = s.clone().requires_grad_()
    r = ref.reference_sum(name, s64, t, labels, temperature=temperature, **kw, **extra)
    (g_ref,) = torch.autograd.grad(r, s64)
    assert torch.isfinite(r) and torch.isfinite(g_ref).all()

    # the naive float32 computation (full logits, autograd): at +-1e4 logits a float32 log-prob carries an absolute
    # error of about ulp(1e4) ~ 1e-3 whatever the implementation, and akl's detached head/tail split can flip at
    # the mu boundary; float32 results must then be as good as the naive float32 ones.
    s32 = s.float().requires_grad_()
    r32 = ref.reference_sum(name, s32, t.float(), labels, temperature=temperature, **kw, **extra)
    (g32,) = torch.autograd.grad(r32, s32)
    scale = max(1.0, float(r.detach().abs()))
    gscale = max(1.0, float(g_ref.abs().max()))
    naive_val_err = abs(float(r32.detach()) - float(r.detach()))
    naive_grad_err = float((g32.double() - g_ref).abs().max())

    # the library in float64 (tight) and in float32 (the production dtype)
    for dtype, rtol in ((D64, 1e-10), (torch.float32, 1e-5)):
        x = s.to(dtype).clone().requires_grad_()
        out = compute_objective(
            name, x, TeacherSignal.dense(t.to(dtype)), labels, temperature=temperature, chunk_size=7, **kw, **extra
        )
        assert out.count == int((labels != -100).sum())
        out.loss_sum.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and torch.isfinite(out.loss_sum)
        val_err = abs(float(out.loss_sum.detach()) - float(r.detach()))
        grad_err = float((x.grad.double() - g_ref).abs().max())
        slack = 1.0 if dtype == D64 else 1.5
        assert val_err <= max(rtol * scale, slack * naive_val_err if dtype != D64 else 0.0), (dtype, val_err)
        assert grad_err <= max(rtol * gscale, slack * naive_grad_err if dtype != D64 else 0.0), (dtype, grad_err)
        assert x.grad[labels == -100].abs().max() == 0  # masked positions get no gradient


@pytest.mark.parametrize("name", ref.ALL)
def test_finite_difference_gradients(name: str) -> None:
    """Central differences on a small vocabulary, in float64. For objectives with stop-gradient weights (akl's
    head/tail ratios, the one-hot weights, hpd's weights) the gradient is that of the loss with the weights frozen
    at the current point, so the differences are taken of that frozen-weight function."""
    n, v = 3, 5
    s, t, labels = _data(n, v, "random", seed=3)
    labels[:] = torch.tensor([1, -100, 4])
    kw = dict(_params(name))
    sampled = torch.tensor([2, 0, 4])  # third position: sample == label
    if name == "hpd":
        kw["sampled_ids"] = sampled
    T = 1.3
    valid = labels != -100
    lab = labels.clamp(min=0)
    lq0 = torch.log_softmax(s / T, -1)
    lp0 = torch.log_softmax(t / T, -1)

    def gather(lx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return lx.gather(-1, ids[:, None]).squeeze(-1)

    if name == "akl":
        rh, rt = ref.akl_ratios(lp0.exp(), lq0.exp(), 0.5)

        def f(x: torch.Tensor) -> float:
            fk = ref.reference_losses("fkl", x, t, temperature=T)
            rk = ref.reference_losses("rkl", x, t, temperature=T)
            return float((rh * fk + rt * rk)[valid].sum())

    elif name in ("rkl_onehot", "jsd_onehot"):
        w0 = torch.tensor(
            [
                ref.onehot_reference_weight(name, float(a), float(b), kw.get("beta", 0.5))
                for a, b in zip(gather(lq0, lab), gather(lp0, lab), strict=True)
            ],
            dtype=D64,
        )

        def f(x: torch.Tensor) -> float:
            return float((-w0 * gather(torch.log_softmax(x / T, -1), lab))[valid].sum())

    elif name == "hpd":
        ws = [
            ref.hpd_reference_weights(
                float(lq0[i, lab[i]]),
                float(lp0[i, lab[i]]),
                float(lq0[i, sampled[i]]),
                float(lp0[i, sampled[i]]),
                bool(lab[i] != sampled[i]),
            )
            for i in range(n)
        ]
        we, wsm = torch.tensor([w[0] for w in ws], dtype=D64), torch.tensor([w[1] for w in ws], dtype=D64)

        def f(x: torch.Tensor) -> float:
            lq = torch.log_softmax(x / T, -1)
            return float((-we * gather(lq, lab) - wsm * gather(lq, sampled))[valid].sum())

    else:  # a true gradient: differentiate the library's own value

        def f(x: torch.Tensor) -> float:
            with torch.no_grad():
                return float(compute_objective(name, x, t, labels, temperature=T, **kw).loss_sum)

    x = s.clone().requires_grad_()
    out = compute_objective(name, x, TeacherSignal.dense(t), labels, temperature=T, **kw)
    out.loss_sum.backward()
    assert float(out.loss_sum.detach()) == pytest.approx(f(s), rel=1e-12)
    assert x.grad is not None
    eps = 1e-6
    fd = torch.zeros_like(s)
    for i in range(n):
        for j in range(v):
            e = torch.zeros_like(s)
            e[i, j] = eps
            fd[i, j] = (f(s + e) - f(s - e)) / (2 * eps)
    assert torch.allclose(x.grad, fd, atol=1e-7, rtol=1e-6), (x.grad, fd)


# ---------------------------------------------------------------------------------------------------------------
# One-hot estimators: gradient = -w (onehot(a) - q) / T with w stop-gradient
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "seqkd", "rkl_onehot", "jsd_onehot", "hpd"])
def test_onehot_gradient_identity(name: str) -> None:
    n, v, T = 16, 9, 1.5
    s, t, labels = _data(n, v, "random", seed=5)
    kw = dict(_params(name))
    sampled = _sampled(n, v, seed=7)
    if name == "hpd":
        kw["sampled_ids"] = sampled
    x = s.clone().requires_grad_()
    compute_objective(name, x, TeacherSignal.dense(t), labels, temperature=T, **kw).loss_sum.backward()
    lq = torch.log_softmax(s / T, -1)
    lp = torch.log_softmax(t / T, -1)
    q = lq.exp()
    expected = torch.zeros_like(s)
    for i in range(n):
        a = int(labels[i])
        if a == -100:
            continue
        if name == "hpd":
            b = int(sampled[i])
            we, ws = ref.hpd_reference_weights(
                float(lq[i, a]), float(lp[i, a]), float(lq[i, b]), float(lp[i, b]), a != b
            )
            terms = [(we, a), (ws, b)]
        else:
            terms = [(ref.onehot_reference_weight(name, float(lq[i, a]), float(lp[i, a]), kw.get("beta", 0.5)), a)]
        for w, tok in terms:
            oh = torch.zeros(v, dtype=D64)
            oh[tok] = 1
            expected[i] += -w * (oh - q[i]) / T
    assert torch.allclose(x.grad, expected, atol=1e-12)


def test_onehot_weights_are_the_unified_view() -> None:
    """seqkd w = p, rkl_onehot w = k1 (HPD's raw expert gap), sft w = 1: read back through the metrics."""
    n, v = 10, 6
    s, t, _ = _data(n, v, "random", seed=11)
    labels = torch.arange(n) % v
    lq = torch.log_softmax(s, -1).gather(-1, labels[:, None]).squeeze(-1)
    lp = torch.log_softmax(t, -1).gather(-1, labels[:, None]).squeeze(-1)
    k1 = lq.exp() * (lp - lq)
    m = {
        name: compute_objective(name, s, t, labels).metrics[f"{name}/weight_mean"]
        for name in ("sft", "seqkd", "rkl_onehot")
    }
    assert m["sft"] == 1.0
    assert m["seqkd"] == pytest.approx(float(lp.exp().mean()), rel=1e-12)
    assert m["rkl_onehot"] == pytest.approx(float(k1.mean()), rel=1e-12)
    hpd_m = compute_objective("hpd", s, t, labels, use_sample=False).metrics
    assert hpd_m["hpd/k1_expert_mean"] == pytest.approx(float(k1.mean()), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# HPD branches, constructed
# ---------------------------------------------------------------------------------------------------------------


def _hpd_case(q_row: list[float], p_row: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([q_row], dtype=D64).log(), torch.tensor([p_row], dtype=D64).log()


@pytest.mark.parametrize(
    "branch,q_row,p_row,label,sample",
    [
        # Reinforce: student under-estimates the label (k1 > 0) and over-estimates the sample (k1' < 0)
        ("reinforce", [0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.2, 0.2], 0, 1),
        # mask: the student already over-estimates the label (k1 <= 0): w* = k1 < 0, no forward term, and no
        # Reinforce even though the sample is over-estimated too (k1' < 0: the sample is still suppressed)
        ("mask", [0.6, 0.3, 0.05, 0.05], [0.2, 0.1, 0.35, 0.35], 0, 1),
        # mask with an under-estimated sample (k1' > 0): only the negative expert weight remains
        ("mask", [0.6, 0.1, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1], 0, 1),
        # forward: k1 > 0 but the sample is under-estimated too (k1' >= 0): w* = p + k1, no sample term
        ("forward", [0.1, 0.1, 0.2, 0.6], [0.5, 0.3, 0.1, 0.1], 0, 1),
        # sample equals the label: no sample term, whatever k1'
        ("same", [0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.2, 0.2], 0, 0),
        # k1 == 0 exactly (p(a*) == q(a*)): w* = k1 = 0 (Eq. 12 / the LlamaFactory code)
        ("zero", [0.25, 0.5, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], 0, 1),
    ],
)
def test_hpd_branches(branch: str, q_row: list[float], p_row: list[float], label: int, sample: int) -> None:
    s, t = _hpd_case(q_row, p_row)
    q, p = torch.tensor(q_row, dtype=D64), torch.tensor(p_row, dtype=D64)
    k1 = float(q[label] * (p[label].log() - q[label].log()))
    k1s = float(q[sample] * (p[sample].log() - q[sample].log()))
    p_e = float(p[label])
    w_expert = {"reinforce": 2 * p_e + k1, "mask": k1, "forward": p_e + k1, "same": p_e + k1, "zero": 0.0}[branch]
    w_sample = k1s if (sample != label and k1s < 0) else 0.0  # only ever suppressive
    expected = (w_expert, w_sample)
    if branch == "reinforce":
        assert k1 > 0 and k1s < 0
    if branch == "mask":
        assert k1 <= 0
    if branch == "forward":
        assert k1 > 0 and k1s >= 0
    if branch == "zero":
        assert k1 == 0.0 and k1s < 0

    lab, smp = torch.tensor([label]), torch.tensor([sample])
    x = s.clone().requires_grad_()
    out = compute_objective("hpd", x, TeacherSignal.dense(t), lab, sampled_ids=smp)
    out.loss_sum.backward()
    we, ws = expected
    lq = torch.log_softmax(s, -1)[0]
    assert float(out.loss_sum) == pytest.approx(-we * float(lq[label]) - ws * float(lq[sample]), abs=1e-12)
    oh_a = torch.nn.functional.one_hot(lab, 4)[0].to(D64)
    oh_b = torch.nn.functional.one_hot(smp, 4)[0].to(D64)
    g = -we * (oh_a - q) - ws * (oh_b - q)
    assert torch.allclose(x.grad[0], g, atol=1e-12)
    m = out.metrics
    assert m["hpd/masked_frac"] == (1.0 if branch in ("mask", "zero") else 0.0)
    assert m["hpd/reinforce_frac"] == (1.0 if branch == "reinforce" else 0.0)
    assert m["hpd/sample_active_frac"] == (1.0 if ws != 0 else 0.0)
    assert m["hpd/sample_differs_frac"] == (0.0 if branch == "same" else 1.0)
    assert m["hpd/k1_expert_mean"] == pytest.approx(k1, abs=1e-12)
    if branch != "same":
        assert m["hpd/k1_sample_mean"] == pytest.approx(k1s, abs=1e-12)

    # the weights helper agrees
    w = hpd_weights(lq[[label]], torch.log(p[[label]]), lq[[sample]], torch.log(p[[sample]]), smp != lab)
    assert float(w.w_expert) == pytest.approx(we, abs=1e-12) and float(w.w_sample) == pytest.approx(ws, abs=1e-12)


def test_hpd_ablations_and_token_signal() -> None:
    n, v = 20, 8
    s, t, labels = _data(n, v, "random", seed=21)
    sampled = _sampled(n, v, seed=4)
    kw = {"sampled_ids": sampled}
    # reinforce=False: the expert weight loses exactly the +p(a*) of the Reinforce branch
    for flags in ({"reinforce": False}, {"use_sample": False}):
        x = s.clone().requires_grad_()
        out = compute_objective("hpd", x, TeacherSignal.dense(t), labels, **kw, **flags)
        r = ref.reference_sum("hpd", s, t, labels, sampled_ids=sampled, **flags)
        assert float(out.loss_sum) == pytest.approx(float(r), rel=1e-12)
    # an API teacher that returns the log-probs of the label and of the sample gives the same loss and gradient
    lp = torch.log_softmax(t, -1)
    lab0 = labels.clamp(min=0)
    sig = TeacherSignal.token_logprobs(
        lp.gather(-1, lab0[:, None]).squeeze(-1), sampled, lp.gather(-1, sampled[:, None]).squeeze(-1)
    )
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = compute_objective("hpd", x1, TeacherSignal.dense(t), labels, sampled_ids=sampled)
    b = compute_objective("hpd", x2, sig, labels)
    a.loss_sum.backward()
    b.loss_sum.backward()
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-12)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-13)
    assert a.metrics == pytest.approx(b.metrics, rel=1e-12)
    # the token signal without samples: a clear error, unless the no-sampling ablation is asked for
    with pytest.raises(UserError, match="sampled"):
        compute_objective("hpd", s, TeacherSignal.token_logprobs(sig.label_logprobs), labels)
    compute_objective("hpd", s, TeacherSignal.token_logprobs(sig.label_logprobs), labels, use_sample=False)
    with pytest.raises(UserError, match="do not also pass sampled_ids"):
        compute_objective("hpd", s, sig, labels, sampled_ids=sampled)


def test_hpd_samples_from_student_at_temperature_one() -> None:
    """Without sampled_ids, hpd draws one token per position from softmax(student logits) (T = 1, whatever the
    loss temperature): check the empirical frequencies on a 3-token vocabulary, and reproducibility."""
    probs = torch.tensor([0.7, 0.2, 0.1], dtype=D64)
    n = 4000
    s = probs.log().expand(n, 3).clone()
    t = torch.zeros(n, 3, dtype=D64)
    labels = torch.zeros(n, dtype=torch.long)
    m = compute_objective("hpd", s, t, labels, temperature=3.0, generator=torch.Generator().manual_seed(0)).metrics
    # the sample differs from the label (token 0) with probability 0.3
    assert m["hpd/sample_differs_frac"] == pytest.approx(0.3, abs=0.03)
    loss, m1 = hpd_loss(s, t, labels, generator=torch.Generator().manual_seed(5), chunk_size=333)
    loss2, m2 = hpd_loss(s, t, labels, generator=torch.Generator().manual_seed(5), chunk_size=333)
    assert float(loss) == float(loss2) and m1 == m2


# ---------------------------------------------------------------------------------------------------------------
# TRL's generalized_jsd_loss: same numbers, documented discontinuity, unscaled variant
# ---------------------------------------------------------------------------------------------------------------


def trl_generalized_jsd_loss(
    student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"
):
    """TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` semantics, transcribed (num_items_in_batch omitted)."""
    F = torch.nn.functional
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            m, s, reduction="none", log_target=True
        )
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if mask is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_matches_trl(beta: float, reduction: str, with_labels: bool) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g) * 3
    t = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    lab = labels if with_labels else None
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = generalized_jsd_loss(x1, t, lab, beta=beta, temperature=1.7, reduction=reduction, chunk_size=4)
    theirs = trl_generalized_jsd_loss(x2, t, lab, beta=beta, temperature=1.7, reduction=reduction)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)


def test_generalized_jsd_num_items_and_empty_batch() -> None:
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    full = generalized_jsd_loss(s, t, labels, reduction="sum")
    assert torch.allclose(generalized_jsd_loss(s, t, labels, num_items_in_batch=10), full / 10)
    assert torch.allclose(generalized_jsd_loss(s, t, labels, num_items_in_batch=torch.tensor(10)), full / 10)
    empty = torch.full((2, 4), -100)
    for red in ("batchmean", "sum", "mean"):
        x = s.clone().requires_grad_()
        v = generalized_jsd_loss(x, t, empty, reduction=red)
        v.backward()
        assert float(v) == 0.0 and x.grad is not None and x.grad.abs().max() == 0


def test_jsd_discontinuity_and_unscaled_variant() -> None:
    s, t, labels = _data(12, 9, "random", seed=2)
    fkl = float(compute_objective("fkl", s, t, labels).loss_sum)
    rkl = float(compute_objective("rkl", s, t, labels).loss_sum)

    def jsd(beta: float, unscaled: bool = False) -> float:
        return float(compute_objective("jsd", s, t, labels, beta=beta, unscaled=unscaled).loss_sum)

    # TRL's convention: the ends are the exact KLs ...
    assert jsd(0.0) == pytest.approx(fkl, rel=1e-12) and jsd(1.0) == pytest.approx(rkl, rel=1e-12)
    # ... but just inside them the scaled value is ~beta * KL: a jump at both ends
    assert jsd(1e-6) == pytest.approx(1e-6 * fkl, rel=1e-3)
    assert jsd(1 - 1e-6) == pytest.approx(1e-6 * rkl, rel=1e-3)
    # unscaled: divided by beta (1 - beta), continuous with the exact KLs at the ends
    assert jsd(1e-6, True) == pytest.approx(fkl, rel=1e-3)
    assert jsd(1 - 1e-6, True) == pytest.approx(rkl, rel=1e-3)
    assert jsd(0.5, True) == pytest.approx(4 * jsd(0.5), rel=1e-12)
    assert jsd(0.0, True) == pytest.approx(fkl, rel=1e-12)
    # and it matches the reference
    r = ref.reference_sum("jsd", s, t, labels, beta=0.3, unscaled=True)
    assert jsd(0.3, True) == pytest.approx(float(r), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Top-k signal (with tail bucket) and token-log-prob signal
# ---------------------------------------------------------------------------------------------------------------


def _bucket_reference(name: str, s: torch.Tensor, lp_full: torch.Tensor, ids: torch.Tensor, **kw) -> torch.Tensor:
    """The divergence between the (k+1)-bucket coarse-grainings, from full float64 distributions."""
    lq = torch.log_softmax(s, -1)

    def buckets(lx: torch.Tensor) -> torch.Tensor:
        top = lx.gather(-1, ids)
        rest = lx.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([top, rest], -1)

    # reference_losses takes logits; log-probs over the buckets are valid logits for it
    return ref.reference_losses(name, buckets(lq), buckets(lp_full), **kw)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
@pytest.mark.parametrize("k", [1, 4, 13])
def test_topk_signal_matches_bucket_reference(name: str, k: int) -> None:
    n, v = 10, 13
    s, t, labels = _data(n, v, "random", seed=8)
    lp = torch.log_softmax(t, -1)
    top_lp, ids = lp.topk(k, dim=-1)
    kw = _params(name)
    x = s.clone().requires_grad_()
    out = compute_objective(name, x, TeacherSignal.topk(ids, top_lp), labels, chunk_size=3, **kw)
    out.loss_sum.backward()
    x2 = s.clone().requires_grad_()
    if k == v:
        # k = V: the buckets are the vocabulary and the tail is empty (-inf): the full divergence, no NaN
        r = ref.reference_sum(name, x2, t, labels, **kw)
    else:
        r = _bucket_reference(name, x2, lp, ids, **kw)[labels != -100].sum()
    r.backward()
    assert float(out.loss_sum) == pytest.approx(float(r), rel=1e-10, abs=1e-12)
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)
    # coarse-graining never increases an f-divergence
    full = ref.reference_sum(name, s, t, labels, **kw)
    assert float(out.loss_sum) <= float(full) + 1e-9
    assert out.metrics["topk/teacher_tail_mass"] >= 0


def test_topk_explicit_tail_and_zero_tail() -> None:
    n, v, k = 6, 9, 3
    s, t, labels = _data(n, v, "random", seed=9)
    lp = torch.log_softmax(t, -1)
    top_lp, ids = lp.topk(k, -1)
    tail = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    a = compute_objective("fkl", s, TeacherSignal.topk(ids, top_lp), labels).loss_sum
    b = compute_objective("fkl", s, TeacherSignal.topk(ids, top_lp, tail), labels).loss_sum
    assert float(a) == pytest.approx(float(b), rel=1e-12)
    # a truncated teacher: top-k renormalised, zero tail mass. Forward KL is fine (no NaN) ...
    trunc = top_lp - top_lp.logsumexp(-1, keepdim=True)
    x = s.clone().requires_grad_()
    out = compute_objective("fkl", x, TeacherSignal.topk(ids, trunc), labels)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(x.grad).all()
    assert out.metrics["topk/teacher_tail_mass"] == pytest.approx(0.0, abs=1e-12)
    compute_objective("jsd", s, TeacherSignal.topk(ids, trunc), labels)  # mixtures stay finite
    # ... reverse KL is infinite, and says where
    with pytest.raises(UserError, match=r"infinite at position \d+"):
        compute_objective("rkl", s, TeacherSignal.topk(ids, trunc), labels)


def test_topk_and_token_signal_rejections() -> None:
    n, v = 4, 7
    s, t, labels = _data(n, v, "random", seed=10)
    lp = torch.log_softmax(t, -1)
    top_lp, ids = lp.topk(3, -1)
    topk = TeacherSignal.topk(ids, top_lp)
    for name in ("akl", "seqkd", "rkl_onehot", "jsd_onehot", "hpd"):
        with pytest.raises(UserError, match=f"objective '{name}' cannot use a teacher signal of kind 'topk'"):
            compute_objective(name, s, topk, labels)
    tok = TeacherSignal.token_logprobs(lp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1))
    for name in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"):
        with pytest.raises(UserError, match="kind 'token_logprobs'"):
            compute_objective(name, s, tok, labels)
    # the one-hot estimators on token log-probs equal the dense computation
    for name in ("sft", "seqkd", "rkl_onehot", "jsd_onehot"):
        x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        a = compute_objective(name, x1, tok, labels)
        b = compute_objective(name, x2, TeacherSignal.dense(t), labels)
        a.loss_sum.backward()
        b.loss_sum.backward()
        assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-12)
        assert torch.allclose(x1.grad, x2.grad, atol=1e-13)
    # sft also runs without any teacher
    assert float(compute_objective("sft", s, None, labels).loss_sum) == pytest.approx(
        float(compute_objective("sft", s, tok, labels).loss_sum)
    )
    with pytest.raises(UserError, match="needs a teacher signal"):
        compute_objective("fkl", s, None, labels)
    # the loss temperature needs the full distribution
    with pytest.raises(UserError, match="temperature"):
        compute_objective("fkl", s, topk, labels, temperature=2.0)
    with pytest.raises(UserError, match="temperature"):
        compute_objective("seqkd", s, tok, labels, temperature=2.0)


def test_topk_validation_errors() -> None:
    s = torch.randn(2, 3, 6)
    lp = torch.log_softmax(torch.randn(2, 3, 6), -1)
    top_lp, ids = lp.topk(2, -1)
    labels = torch.zeros(2, 3, dtype=torch.long)
    dup = ids.clone()
    dup[1, 2, 1] = dup[1, 2, 0]
    with pytest.raises(UserError, match=r"position 5 \(batch 1, time 2\).*repeated"):
        compute_objective("fkl", s, TeacherSignal.topk(dup, top_lp), labels)
    bad = ids.clone()
    bad[0, 1, 0] = 6
    with pytest.raises(UserError, match=r"batch 0, time 1.*outside the student vocabulary"):
        compute_objective("fkl", s, TeacherSignal.topk(bad, top_lp), labels)
    with pytest.raises(UserError, match="sum to 1.2000 > 1"):
        compute_objective("fkl", s, TeacherSignal.topk(ids, torch.full((2, 3, 2), 0.6).log()), labels)
    nan = top_lp.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"batch 0, time 0"):
        compute_objective("fkl", s, TeacherSignal.topk(ids, nan), labels)
    # values at ignored positions are never read
    labels2 = labels.clone()
    labels2[0, 0] = -100
    compute_objective("fkl", s, TeacherSignal.topk(ids, nan), labels2)


# ---------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------------------------

_logits = st.lists(st.floats(-30, 30, allow_nan=False), min_size=6, max_size=6)


def _pair(a: list[float], b: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([a], dtype=D64), torch.tensor([b], dtype=D64)


# beta: the exact ends, or far enough inside (0, 1) that 1 - beta is not rounded to 1 (that rounding IS the
# documented TRL discontinuity: 1 - 1e-300 == 1.0 selects the unscaled reverse KL)
_beta = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-6, 1 - 1e-6))


@settings(max_examples=40, deadline=None)
@given(_logits, _logits, _beta, st.floats(0.05, 0.95), st.floats(-50, 50))
def test_divergence_invariants(a: list[float], b: list[float], beta: float, alpha: float, shift: float) -> None:
    s, t = _pair(a, b)

    def d(name: str, x: torch.Tensor, y: torch.Tensor, **kw) -> float:
        return float(compute_objective(name, x, y, **kw).loss_sum)

    kws = {
        "fkl": {},
        "rkl": {},
        "jsd": {"beta": beta},
        "tvd": {},
        "skl": {"alpha": alpha},
        "srkl": {"alpha": alpha},
        "akl": {},
    }
    vals = {name: d(name, s, t, **kw) for name, kw in kws.items()}
    for name, v in vals.items():
        assert v >= -1e-9, (name, v)  # non-negative
        assert d(name, s, s, **kws[name]) == pytest.approx(0.0, abs=1e-9)  # zero when p == q
        shifted = d(name, s + shift, t - shift, **kws[name])  # logits are log-odds: a shift changes nothing
        assert shifted == pytest.approx(v, rel=1e-7, abs=1e-9), name
    assert vals["tvd"] <= 1 + 1e-12
    assert vals["fkl"] == pytest.approx(d("rkl", t, s), rel=1e-9, abs=1e-12)
    assert vals["jsd"] == pytest.approx(d("jsd", t, s, beta=1 - beta), rel=1e-7, abs=1e-10)  # role swap
    assert vals["skl"] == pytest.approx(d("srkl", t, s, alpha=alpha), rel=1e-7, abs=1e-10)
    # the skewed KLs are bounded by log(1/alpha) (the mixture keeps alpha of the first argument)
    assert vals["skl"] <= math.log(1 / alpha) + 1e-9 and vals["srkl"] <= math.log(1 / alpha) + 1e-9
    # inside (0, 1), generalized JSD is bounded by the entropy of the mixture weights
    if 0 < beta < 1:
        assert vals["jsd"] <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-9


@settings(max_examples=25, deadline=None)
@given(_logits, _logits, st.integers(0, 5), st.integers(0, 5))
def test_hpd_sample_weight_only_suppresses(a: list[float], b: list[float], label: int, sample: int) -> None:
    s, t = _pair(a, b)
    lq, lp = torch.log_softmax(s, -1)[0], torch.log_softmax(t, -1)[0]
    w = hpd_weights(lq[[label]], lp[[label]], lq[[sample]], lp[[sample]], torch.tensor([label != sample]))
    assert float(w.w_sample) <= 0.0
    if label == sample:
        assert float(w.w_sample) == 0.0 and not bool(w.reinforced)
    if bool(w.masked):
        assert float(w.w_expert) == pytest.approx(float(w.k1)) and float(w.w_expert) <= 0
    else:
        assert float(w.w_expert) >= float(lp[label].exp()) - 1e-12  # forward-KL-like or stronger


def test_registry_lists_every_builtin() -> None:
    assert list(available_objectives())[:12] == list(ref.ALL)
