"""distillarena.objectives: the machinery. Chunked and fused paths against the naive one, gradient accumulation,
empty batches, error messages, vocabulary alignment, the registry, dtypes."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import test_objectives_reference as ref  # noqa: E402 - tests/ is on sys.path (pytest rootdir import)
import torch

from distillarena.core.errors import UserError
from distillarena.objectives import (
    LMHeadInput,
    TeacherSignal,
    VocabAlignmentWarning,
    available_objectives,
    compute_objective,
    register_objective,
    unregister_objective,
)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
F32 = torch.float32
PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "jsd_onehot": {"beta": 0.4}}


def _problem(seed: int = 0, n: int = 37, v: int = 50, h: int = 16, ht: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {
        "h": torch.randn(n, h, generator=g),
        "W": torch.randn(v, h, generator=g) * 0.5,
        "b": torch.randn(v, generator=g) * 0.1,
        "ht": torch.randn(n, ht, generator=g),
        "Wt": torch.randn(v, ht, generator=g) * 0.7,
        "bt": torch.randn(v, generator=g) * 0.1,
        "labels": torch.randint(0, v, (n,), generator=g),
        "sampled": torch.randint(0, v, (n,), generator=g),
    }
    d["labels"][torch.rand(n, generator=g) < 0.25] = -100
    return d


def equality_errors(name: str, chunk_size: int, path: str, temperature: float = 1.3, seed: int = 0) -> dict:
    """Relative errors (norm-wise) of the chunked ("logits") or fused ("fused") path against the naive float32
    path (full logits, the reference formula, autograd), for the loss and each gradient."""
    d = _problem(seed)
    kw = dict(PARAMS.get(name, {}))
    extra = {"sampled_ids": d["sampled"]} if name == "hpd" else {}
    # naive
    h0, W0, b0 = (d[k].clone().requires_grad_() for k in ("h", "W", "b"))
    zt = d["ht"] @ d["Wt"].T + d["bt"]
    r = ref.reference_sum(name, h0 @ W0.T + b0, zt, d["labels"], temperature=temperature, **kw, **extra)
    r.backward()
    # ours
    h1, W1, b1 = (d[k].clone().requires_grad_() for k in ("h", "W", "b"))
    if path == "logits":
        student = h1 @ W1.T + b1
        teacher = TeacherSignal.dense(zt)
    else:
        student = LMHeadInput(h1, W1, b1)
        teacher = TeacherSignal.dense(LMHeadInput(d["ht"], d["Wt"], d["bt"]))
    out = compute_objective(
        name, student, teacher, d["labels"], temperature=temperature, chunk_size=chunk_size, **kw, **extra
    )
    assert out.count == int((d["labels"] != -100).sum())
    out.loss_sum.backward()
    assert h1.grad is not None and W1.grad is not None and b1.grad is not None
    assert h1.grad[d["labels"] == -100].abs().max() == 0
    return {
        "loss": ref.rel_err(out.loss_sum, r),
        "grad_hidden": ref.rel_err(h1.grad, h0.grad),
        "grad_weight": ref.rel_err(W1.grad, W0.grad),
        "grad_bias": ref.rel_err(b1.grad, b0.grad),
    }


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("name", ref.ALL)
def test_chunked_and_fused_equal_naive(name: str, path: str) -> None:
    # 28 valid positions out of 37: chunk sizes that divide neither, one that holds everything, and 1
    for chunk_size in (1, 5, 16, 64):
        errs = equality_errors(name, chunk_size, path)
        # hpd's loss sums weights of both signs (the mask branch is negative), so the relative error of the sum is
        # float32 rounding amplified by cancellation: 1.2e-5 at chunk size 1 on an AVX-512 CPU; gradients stay 1e-6
        loss_tol = 3e-5 if name == "hpd" else 1e-5
        assert errs["loss"] <= loss_tol and max(v for k, v in errs.items() if k != "loss") <= 1e-5, (chunk_size, errs)


@pytest.mark.parametrize(
    "name,path", [("jsd", "fused"), ("hpd", "fused"), ("fkl", "logits"), ("akl", "fused"), ("seqkd", "logits")]
)
def test_gradient_accumulation_equals_one_big_batch(name: str, path: str) -> None:
    """4 micro-batches with uneven valid-token counts (one fully masked), each loss_sum divided by the global count,
    accumulate exactly the gradient of the one big batch."""
    d = _problem(seed=3, n=40)
    labels = d["labels"].clone()
    labels[:10] = torch.arange(10)  # micro-batch 0: 10 valid
    labels[10:20] = -100
    labels[12:15] = torch.tensor([1, 2, 3])  # micro-batch 1: 3 valid
    labels[20:30] = -100  # micro-batch 2: none
    labels[30:40] = torch.arange(10) + 5  # micro-batch 3: 10 valid
    labels[33] = -100  # ... 9 valid
    kw = dict(PARAMS.get(name, {}))
    if name == "hpd":
        kw["sampled_ids"] = d["sampled"]

    def run(rows: slice, h: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, int]:
        kwr = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        zt = d["ht"][rows] @ d["Wt"].T
        student = LMHeadInput(h[rows], W) if path == "fused" else h[rows] @ W.T
        out = compute_objective(name, student, zt, labels[rows], chunk_size=4, **kwr)
        return out.loss_sum, out.count

    hb, Wb = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    big, count = run(slice(0, 40), hb, Wb)
    (big / count).backward()

    hm, Wm = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    micro = [slice(0, 10), slice(10, 20), slice(20, 30), slice(30, 40)]
    counts = [int((labels[m] != -100).sum()) for m in micro]
    assert counts == [10, 3, 0, 9] and sum(counts) == count
    for m in micro:
        loss_sum, c = run(m, hm, Wm)
        (loss_sum / count).backward()  # normalised once, by the global count
    assert ref.rel_err(hm.grad, hb.grad) <= 1e-6 and ref.rel_err(Wm.grad, Wb.grad) <= 1e-6

    # the per-micro-batch mean (the classic bug) would not be the same update
    hw, Ww = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    for m in micro:
        loss_sum, c = run(m, hw, Ww)
        (loss_sum / max(c, 1) / len(micro)).backward()
    assert ref.rel_err(Ww.grad, Wb.grad) > 1e-3


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_fully_masked_batch_is_zero_not_nan(path: str) -> None:
    d = _problem(seed=4, n=6)
    labels = torch.full((6,), -100)
    for name in ref.ALL:
        h, W = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
        student = LMHeadInput(h, W) if path == "fused" else h @ W.T
        out = compute_objective(name, student, d["ht"] @ d["Wt"].T, labels, **PARAMS.get(name, {}))
        assert out.count == 0 and float(out.loss_sum) == 0.0 and float(out.mean()) == 0.0
        assert out.loss_sum.grad_fn is not None  # still connected: backward works and gives zeros
        (out.loss_sum / max(out.count, 1)).backward()
        assert h.grad is not None and h.grad.abs().max() == 0 and torch.isfinite(h.grad).all()
        assert W.grad is not None and W.grad.abs().max() == 0
        assert all(v == v for v in out.metrics.values())  # no NaN in the diagnostics either
    # an empty batch (no positions at all)
    out = compute_objective("fkl", torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5), torch.zeros(0).long())
    assert out.count == 0 and float(out.loss_sum) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_teacher_logits_name_the_position(bad: float) -> None:
    s = torch.randn(2, 3, 7)
    t = torch.randn(2, 3, 7)
    t[1, 2, 4] = bad
    labels = torch.randint(0, 7, (2, 3))
    for name in ("fkl", "jsd", "hpd"):
        with pytest.raises(UserError, match=r"teacher logits at position 5 \(batch 1, time 2\) contain NaN or \+-inf"):
            compute_objective(name, s, t, labels, chunk_size=2)
    # the fused teacher too
    ht, Wt = torch.randn(2, 3, 4), torch.randn(7, 4)
    ht[0, 1, 0] = bad
    with pytest.raises(UserError, match=r"position 1 \(batch 0, time 1\)"):
        compute_objective("fkl", s, LMHeadInput(ht, Wt), labels)
    # a bad value at an ignored position is never read
    labels[1, 2] = -100
    out = compute_objective("fkl", s, t, labels)
    assert torch.isfinite(out.loss_sum)


def test_vocab_mismatch_and_padded_alignment() -> None:
    g = torch.Generator().manual_seed(5)
    n, v, pad = 9, 10, 3
    s = torch.randn(n, v, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    t_pad = torch.cat([t, torch.full((n, pad), -1e4, dtype=torch.float64)], -1)  # padded teacher (e.g. 152064)
    with pytest.raises(UserError, match=r"vocabulary size 10 differs from the teacher's 13.*align_vocab=True"):
        compute_objective("fkl", s, t_pad, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # padding columns carry no mass: no warning
        for name in ("fkl", "jsd", "akl", "hpd", "seqkd"):
            kw = {"sampled_ids": labels.flip(0)} if name == "hpd" else {}
            a = compute_objective(name, s, t_pad, labels, align_vocab=True, **kw)
            b = compute_objective(name, s, t, labels, **kw)
            assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-12)
            assert a.metrics["vocab/teacher_dropped_mass"] < 1e-12
    # columns that carry real mass: a warning that says how much
    t_heavy = torch.cat([t, torch.full((n, pad), 2.0, dtype=torch.float64)], -1)
    with pytest.warns(VocabAlignmentWarning, match=r"dropped 3 teacher vocabulary columns that carry"):
        out = compute_objective("fkl", s, t_heavy, labels, align_vocab=True)
    assert out.metrics["vocab/teacher_dropped_mass"] > 1e-3
    # the student is the padded one: its extra columns get no gradient; labels must be in the shared vocabulary
    s_pad = torch.cat([s, torch.full((n, pad), -1e4, dtype=torch.float64)], -1).requires_grad_()
    out = compute_objective("rkl", s_pad, t, labels, align_vocab=True)
    out.loss_sum.backward()
    assert float(out.loss_sum) == pytest.approx(float(compute_objective("rkl", s, t, labels).loss_sum), rel=1e-12)
    assert s_pad.grad is not None and s_pad.grad[:, v:].abs().max() == 0
    bad = labels.clone()
    bad[4] = 11
    with pytest.raises(UserError, match=r"label 11 at position 4 is outside the vocabulary \[0, 10\)"):
        compute_objective("fkl", s_pad, t, bad, align_vocab=True)
    # fused: a teacher lm_head with padded rows, and a student lm_head with padded rows
    h, W = torch.randn(n, 4, dtype=torch.float64), torch.randn(v, 4, dtype=torch.float64)
    ht, Wt = torch.randn(n, 6, dtype=torch.float64), torch.randn(v, 6, dtype=torch.float64)
    Wt_pad = torch.cat([Wt, torch.zeros(pad, 6, dtype=torch.float64)])
    bt_pad = torch.cat([torch.zeros(v, dtype=torch.float64), torch.full((pad,), -1e4, dtype=torch.float64)])
    a = compute_objective("jsd", LMHeadInput(h, W), LMHeadInput(ht, Wt_pad, bt_pad), labels, align_vocab=True)
    b = compute_objective("jsd", h @ W.T, ht @ Wt.T, labels)
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-12)
    W_pad = torch.cat([W, torch.zeros(pad, 4, dtype=torch.float64)]).requires_grad_()
    b_pad = torch.cat([torch.zeros(v, dtype=torch.float64), torch.full((pad,), -1e4, dtype=torch.float64)])
    out = compute_objective("jsd", LMHeadInput(h, W_pad, b_pad), ht @ Wt.T, labels, align_vocab=True)
    out.loss_sum.backward()
    assert float(out.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-12)
    assert W_pad.grad is not None and W_pad.grad[v:].abs().max() == 0


def test_registry_errors_and_a_custom_objective() -> None:
    s, t = torch.randn(5, 6), torch.randn(5, 6)
    labels = torch.randint(0, 6, (5,))
    with pytest.raises(UserError, match=r"unknown objective 'kl'; available: fkl, rkl, jsd"):
        compute_objective("kl", s, t, labels)
    with pytest.raises(UserError, match=r"unknown parameter\(s\) alpha; it accepts: beta, unscaled"):
        compute_objective("jsd", s, t, labels, alpha=0.1)
    with pytest.raises(UserError, match=r"beta must be in \[0, 1\]"):
        compute_objective("jsd", s, t, labels, beta=1.5)
    with pytest.raises(UserError, match=r"needs labels"):
        compute_objective("seqkd", s, t)
    assert set(ref.ALL) <= set(available_objectives())
    assert "TRL convention" in available_objectives()["jsd"]

    @register_objective("test_fkl_plus", signals=("dense", "topk"))
    def fkl_plus(chunk, *, weight: float = 0.0):
        """Forward KL written in three lines (autograd route), plus a weighted reverse KL."""
        lq, lp = chunk.student_logprobs(), chunk.teacher_logprobs()
        return (lp.exp() * (lp - lq)).sum(-1) + weight * (lq.exp() * (lq - lp)).sum(-1)

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_fkl_plus")(fkl_plus)
        d = _problem(seed=6)
        for path in ("logits", "fused"):
            grads = []
            for name, kw in (("test_fkl_plus", {"weight": 0.5}), ("fkl", {}), ("rkl", {})):
                h, W = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
                student = LMHeadInput(h, W) if path == "fused" else h @ W.T
                out = compute_objective(name, student, d["ht"] @ d["Wt"].T, d["labels"], chunk_size=7, **kw)
                out.loss_sum.backward()
                grads.append((float(out.loss_sum), W.grad))
            (c, gc), (f, gf), (r, gr) = grads
            assert c == pytest.approx(f + 0.5 * r, rel=1e-5)
            assert ref.rel_err(gc, gf + 0.5 * gr) <= 1e-5
        # a custom objective works on the top-k signal too (student_logprobs() gives the buckets)
        lp = torch.log_softmax(t, -1)
        top, ids = lp.topk(3, -1)
        a = compute_objective("test_fkl_plus", s, TeacherSignal.topk(ids, top), labels)
        b = compute_objective("fkl", s, TeacherSignal.topk(ids, top), labels)
        assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-5)
        with pytest.raises(UserError, match="kind 'token_logprobs'"):
            compute_objective("test_fkl_plus", s, TeacherSignal.token_logprobs(torch.zeros(5)), labels)
    finally:
        unregister_objective("test_fkl_plus")
    assert "test_fkl_plus" not in available_objectives()


def test_input_validation_messages() -> None:
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    labels = torch.randint(0, 6, (2, 3))
    with pytest.raises(UserError, match=r"labels shape \(6,\) does not match the student's positions \(2, 3\)"):
        compute_objective("fkl", s, t, labels.reshape(-1))
    with pytest.raises(UserError, match="labels must be an integer tensor"):
        compute_objective("fkl", s, t, labels.float())
    bad = labels.clone()
    bad[1, 0] = 6
    with pytest.raises(UserError, match=r"label 6 at position 3 \(batch 1, time 0\) is outside the vocabulary"):
        compute_objective("fkl", s, t, bad)
    bad[1, 0] = -5
    with pytest.raises(UserError, match=r"label -5 at position 3"):
        compute_objective("fkl", s, t, bad)
    with pytest.raises(UserError, match="chunk_size must be a positive integer"):
        compute_objective("fkl", s, t, labels, chunk_size=0)
    with pytest.raises(UserError, match="temperature must be a positive number"):
        compute_objective("fkl", s, t, labels, temperature=0.0)
    with pytest.raises(UserError, match=r"teacher signal positions \(3, 2\) do not match the student's \(2, 3\)"):
        compute_objective("fkl", s, torch.randn(3, 2, 6), labels)
    with pytest.raises(UserError, match="student must be logits"):
        compute_objective("fkl", [1, 2], t, labels)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"hidden size 4 does not match weight \(6, 5\)"):
        LMHeadInput(torch.randn(3, 4), torch.randn(6, 5))
    with pytest.raises(UserError, match="give both sampled_ids and sampled_logprobs"):
        TeacherSignal.token_logprobs(torch.zeros(3), sampled_ids=torch.zeros(3).long())
    with pytest.raises(UserError, match="belongs to kind 'dense'"):
        TeacherSignal(kind="topk", topk_ids=torch.zeros(2, 1).long(), topk_logprobs=torch.zeros(2, 1), logits=t)
    with pytest.raises(UserError, match="hpd: sampled_ids at position 1 is outside"):
        compute_objective("hpd", s[0], t[0], labels[0], sampled_ids=torch.tensor([0, 9, 1]))
    with pytest.raises(UserError, match="sampled_ids must be a tensor with the labels' shape"):
        compute_objective("hpd", s, t, labels, sampled_ids=torch.zeros(6).long())


def test_three_dim_inputs_equal_flattened() -> None:
    s, t = torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(2, 5, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5))
    labels[0, 4] = -100
    x3 = s.clone().requires_grad_()
    a = compute_objective("akl", x3, t, labels)
    a.loss_sum.backward()
    x2 = s.reshape(10, 9).clone().requires_grad_()
    b = compute_objective("akl", x2, t.reshape(10, 9), labels.reshape(10))
    b.loss_sum.backward()
    assert float(a.loss_sum) == float(b.loss_sum) and torch.equal(x3.grad.reshape(10, 9), x2.grad)


def test_bf16_inputs_upcast_and_grad_dtype() -> None:
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(8, 33, generator=g), torch.randn(8, 33, generator=g)
    labels = torch.randint(0, 33, (8,), generator=g)
    xb = s.bfloat16().requires_grad_()
    out = compute_objective("jsd", xb, t.bfloat16(), labels)
    out.loss_sum.backward()
    assert out.loss_sum.dtype == F32 and xb.grad is not None and xb.grad.dtype == torch.bfloat16
    ref_val = compute_objective("jsd", s.bfloat16().float(), t.bfloat16().float(), labels).loss_sum
    assert float(out.loss_sum) == pytest.approx(float(ref_val), rel=1e-6)
    # fused with a bf16 lm_head: grads in the parameters' dtype
    h, W = torch.randn(8, 4).bfloat16().requires_grad_(), torch.randn(33, 4).bfloat16().requires_grad_()
    out = compute_objective("fkl", LMHeadInput(h, W), t, labels)
    out.loss_sum.backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and W.grad is not None
    assert W.grad.dtype == torch.bfloat16


def test_softcap_and_logit_scale_on_the_fused_path() -> None:
    d = _problem(seed=8, n=12)
    h0, W0, b0 = (d[k].clone().requires_grad_() for k in ("h", "W", "b"))
    z = 3.0 * torch.tanh(0.5 * (h0 @ W0.T + b0) / 3.0)
    zt = 2.0 * torch.tanh((d["ht"] @ d["Wt"].T) / 2.0)
    r = ref.reference_sum("rkl", z, zt, d["labels"])
    r.backward()
    h1, W1, b1 = (d[k].clone().requires_grad_() for k in ("h", "W", "b"))
    out = compute_objective(
        "rkl",
        LMHeadInput(h1, W1, b1, logit_scale=0.5, softcap=3.0),
        LMHeadInput(d["ht"], d["Wt"], softcap=2.0),
        d["labels"],
        chunk_size=5,
    )
    out.loss_sum.backward()
    assert ref.rel_err(out.loss_sum, r) <= 1e-6
    for a, b in ((h1, h0), (W1, W0), (b1, b0)):
        assert ref.rel_err(a.grad, b.grad) <= 1e-5


def test_backward_modes() -> None:
    d = _problem(seed=9, n=10)
    zt = d["ht"] @ d["Wt"].T
    # no_grad: a plain value
    with torch.no_grad():
        out = compute_objective("jsd", LMHeadInput(d["h"], d["W"].requires_grad_()), zt, d["labels"])
    assert out.loss_sum.grad_fn is None and torch.isfinite(out.loss_sum)
    d["W"].requires_grad_(False)
    # a frozen lm_head (e.g. LoRA): only the hidden states get a gradient
    h = d["h"].clone().requires_grad_()
    out = compute_objective("jsd", LMHeadInput(h, d["W"]), zt, d["labels"])
    (out.loss_sum * 0.25).backward()
    h2 = d["h"].clone().requires_grad_()
    r = 0.25 * ref.reference_sum("jsd", h2 @ d["W"].T, zt, d["labels"])
    r.backward()
    assert ref.rel_err(h.grad, h2.grad) <= 1e-5
    # the gradients are computed in the forward pass: a second backward is refused with a clear message
    x = torch.randn(4, 6, requires_grad=True)
    out = compute_objective("fkl", x, torch.randn(4, 6))
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        out.loss_sum.backward()


def test_package_does_not_import_transformers() -> None:
    code = (
        "import sys, distillarena.objectives\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'trl', 'accelerate')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_inputs_are_never_modified(temperature: float) -> None:
    """Chunks of contiguous valid positions are read as views of the caller's tensors: nothing may write to them."""
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 8, 11, generator=g), torch.randn(2, 8, 11, generator=g)
    labels = torch.randint(0, 11, (2, 8), generator=g)
    labels[1, 3] = -100  # one gap: some chunks contiguous, some gathered
    s0, t0 = s.clone(), t.clone()
    for name in ref.ALL:
        kw = dict(PARAMS.get(name, {}))
        x = s.clone().requires_grad_()
        x0 = x.detach().clone()
        out = compute_objective(name, x, t, labels, temperature=temperature, chunk_size=4, **kw)
        out.loss_sum.backward()
        assert torch.equal(x.detach(), x0) and torch.equal(t, t0), name
        with torch.no_grad():
            compute_objective(name, s, t, labels, temperature=temperature, chunk_size=4, **kw)
        assert torch.equal(s, s0) and torch.equal(t, t0), name
