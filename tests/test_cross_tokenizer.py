"""A teacher and a student with different tokenizers: ULD and aligned-span objectives against float64 references and
finite differences, the byte-offset alignment on hand-made pieces, the vocabulary map, the second built-in
tokenizer, the lined-up teacher signal (live model, top-k cache, API records), and the distill run end to end."""

from __future__ import annotations

import math

import pytest
import test_cross_reference as ref  # noqa: E402 - tests/ is on sys.path (pytest rootdir import)
import torch

from distillarena.core.errors import UserError
from distillarena.objectives import CrossVocab, LMHeadInput, TeacherSignal, compute_objective, get_objective
from distillarena.teachers.alignment import Span, align, pair_positions, token_table, vocab_map

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
D64 = torch.float64


def _cross_case(n: int = 14, vs: int = 9, vt: int = 13, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vs, generator=g, dtype=D64) * 2
    t = torch.randn(n, vt, generator=g, dtype=D64) * 2
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    labels[0] = 1
    paired = torch.rand(n, generator=g) < 0.8
    matched = paired & (torch.rand(n, generator=g) < 0.5)
    span_lp = torch.where(paired, -torch.rand(n, generator=g, dtype=D64) * 3, torch.full((n,), -math.inf, dtype=D64))
    vmap = torch.full((vt,), -1, dtype=torch.long)
    perm = torch.randperm(vs, generator=g)
    for j, v in enumerate(perm[: min(vs, vt) - 2].tolist()):  # most tokens shared, in another order
        vmap[2 + j] = v
    cross = CrossVocab(vocab_map=vmap, paired=paired, matched=matched, span_logprob=span_lp)
    return s, t, labels, cross


# ---------------------------------------------------------------------------------------------------------------
# ULD and aligned: values and gradients against float64 references
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vt", [13, 6])  # a teacher vocabulary larger and smaller than the student's
@pytest.mark.parametrize("T", [1.0, 1.7])
def test_uld_matches_reference(vt: int, T: float) -> None:
    s, t, labels, cross = _cross_case(vt=vt)
    cross = CrossVocab(vocab_map=torch.full((vt,), -1, dtype=torch.long), paired=cross.paired,
                       matched=torch.zeros_like(cross.paired), span_logprob=cross.span_logprob)
    x = s.clone().requires_grad_()
    r = ref.uld_losses(x, t, labels, cross.paired, T=T).sum()
    (g_ref,) = torch.autograd.grad(r, x)
    for dtype, tol in ((D64, 1e-10), (torch.float32, 2e-5)):
        y = s.to(dtype).clone().requires_grad_()
        out = compute_objective("uld", y, TeacherSignal.dense(t.to(dtype), cross=cross), labels, temperature=T,
                                chunk_size=4)
        out.loss_sum.backward()
        assert abs(float(out.loss_sum) - float(r)) <= tol * max(1.0, abs(float(r)))
        assert float((y.grad.double() - g_ref).abs().max()) <= tol * max(1.0, float(g_ref.abs().max()))
        assert y.grad[labels == -100].abs().max() == 0
    # fused path (hidden states + output layer on both sides) gives the same
    h = torch.randn(s.shape[0], 5, dtype=D64)
    w = torch.randn(s.shape[1], 5, dtype=D64)
    th, tw = torch.randn(s.shape[0], 4, dtype=D64), torch.randn(vt, 4, dtype=D64)
    a = compute_objective("uld", LMHeadInput(h, w), TeacherSignal.dense(LMHeadInput(th, tw), cross=cross), labels,
                          temperature=T, chunk_size=3)
    b = ref.uld_losses(h @ w.T, th @ tw.T, labels, cross.paired, T=T).sum()
    assert abs(float(a.loss_sum) - float(b)) < 1e-10


def test_uld_topk_matches_bucket_reference() -> None:
    s, t, labels, _ = _cross_case(vt=20)
    lp = torch.log_softmax(t, -1)
    k = 5
    top_lp, top_ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, top_ids, -math.inf), -1)
    x = s.clone().requires_grad_()
    out = compute_objective("uld", x, TeacherSignal.topk(top_ids, top_lp, tail), labels, ce_weight=0.0,
                            uld_weight=1.0, chunk_size=4)
    out.loss_sum.backward()
    y = s.clone().requires_grad_()
    per = [ref.sorted_distance_topk(torch.softmax(y[i], -1), top_lp[i].exp(), tail[i].exp())
           for i in range(len(labels)) if int(labels[i]) != -100]
    r = torch.stack(per).sum()
    r.backward()
    assert abs(float(out.loss_sum) - float(r)) < 1e-10
    assert float((x.grad - y.grad).abs().max()) < 1e-10
    # a lower bound of the full sorted distance
    full = compute_objective("uld", s, TeacherSignal.dense(t), labels, ce_weight=0.0, uld_weight=1.0)
    assert float(out.loss_sum) <= float(full.loss_sum) + 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("merged_weight,ce_weight", [(0.0, 0.0), (0.7, 0.3)])
def test_aligned_matches_reference(beta: float, merged_weight: float, ce_weight: float) -> None:
    s, t, labels, cross = _cross_case()
    kw = dict(beta=beta, uld_weight=0.8, merged_weight=merged_weight, ce_weight=ce_weight)
    x = s.clone().requires_grad_()
    r = ref.aligned_losses(x, t, labels, cross.paired, cross.matched, cross.span_logprob, cross.vocab_map,
                           T=1.3, **kw).sum()
    (g_ref,) = torch.autograd.grad(r, x)
    for dtype, tol in ((D64, 1e-10), (torch.float32, 2e-5)):
        y = s.to(dtype).clone().requires_grad_()
        out = compute_objective("aligned", y, TeacherSignal.dense(t.to(dtype), cross=cross), labels,
                                temperature=1.3, chunk_size=5, **kw)
        out.loss_sum.backward()
        assert abs(float(out.loss_sum) - float(r)) <= tol * max(1.0, abs(float(r)))
        assert float((y.grad.double() - g_ref).abs().max()) <= tol * max(1.0, float(g_ref.abs().max()))
    assert 0 < out.metrics["aligned/matched_frac"] < 1


def test_aligned_topk_cross_matches_dense_restricted() -> None:
    """From a top-k signal in the teacher's ids, matched positions use the mapped top-k tokens plus one bucket for
    the rest (the unmapped top-k mass and the tail): the dense reference with the map cut to those tokens."""
    s, t, labels, cross = _cross_case(vt=13)
    k = 6
    lp = torch.log_softmax(t, -1)
    top_lp, top_ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, top_ids, -math.inf), -1)
    matched_only = CrossVocab(vocab_map=cross.vocab_map, paired=cross.paired, matched=cross.paired,
                              span_logprob=cross.span_logprob)
    out = compute_objective("aligned", s, TeacherSignal.topk(top_ids, top_lp, tail, cross=matched_only), labels,
                            beta=0.5)
    per = []
    for i in range(len(labels)):
        if int(labels[i]) == -100 or not bool(cross.paired[i]):
            continue
        vm = torch.full_like(cross.vocab_map, -1)
        vm[top_ids[i]] = cross.vocab_map[top_ids[i]]
        per.append(ref.shared_bucket_jsd(torch.softmax(s[i], -1), lp[i].exp(), vm, 0.5))
    assert abs(float(out.loss_sum) - float(torch.stack(per).sum())) < 1e-10


def test_aligned_same_tokenizer_is_jsd() -> None:
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(10, 7, generator=g, dtype=D64), torch.randn(10, 7, generator=g, dtype=D64)
    labels = torch.randint(0, 7, (10,), generator=g)
    for beta in (0.0, 0.3, 1.0):
        a = compute_objective("aligned", s, t, labels, beta=beta)
        b = compute_objective("jsd", s, t, labels, beta=beta)
        assert abs(float(a.loss_sum) - float(b.loss_sum)) < 1e-12


@pytest.mark.parametrize("name", ["uld", "aligned"])
def test_finite_difference_gradients(name: str) -> None:
    s, t, labels, cross = _cross_case(n=6, vs=5, vt=7, seed=2)
    kw = {"merged_weight": 0.5, "ce_weight": 0.2} if name == "aligned" else {}
    sig = TeacherSignal.dense(t, cross=cross)
    x = s.clone().requires_grad_()
    compute_objective(name, x, sig, labels, temperature=1.2, **kw).loss_sum.backward()
    eps = 1e-6

    def f(y: torch.Tensor) -> float:
        return float(compute_objective(name, y, sig, labels, temperature=1.2, **kw).loss_sum)

    num = torch.zeros_like(s)
    for i in range(s.shape[0]):
        for v in range(s.shape[1]):
            d = torch.zeros_like(s)
            d[i, v] = eps
            num[i, v] = (f(s + d) - f(s - d)) / (2 * eps)
    assert float((num - x.grad).abs().max()) < 1e-6


def test_cross_signal_refused_by_token_level_objectives_and_checked() -> None:
    s, t, labels, cross = _cross_case()
    with pytest.raises(UserError, match="another tokenizer: use an objective made for that"):
        compute_objective("fkl", s, TeacherSignal.dense(t, cross=cross), labels)
    with pytest.raises(UserError, match="vocabulary map"):
        compute_objective("aligned", s, TeacherSignal.dense(t), labels)  # 13 vs 9 tokens and no map
    with pytest.raises(UserError, match="covers"):
        TeacherSignal.dense(t[:, :5], cross=cross)
    bad = cross.vocab_map.clone()
    bad[bad >= 0] = 0
    with pytest.raises(UserError, match="same student token"):
        CrossVocab(vocab_map=bad, paired=cross.paired, matched=cross.matched, span_logprob=cross.span_logprob)
    with pytest.raises(UserError, match="must be a number >= 0"):
        compute_objective("uld", s, TeacherSignal.dense(t, cross=cross), labels, uld_weight=-1.0)
    with pytest.raises(UserError, match="at least one"):
        compute_objective("uld", s, TeacherSignal.dense(t, cross=cross), labels, uld_weight=0.0, ce_weight=0.0)
    ids = torch.full((len(labels), 2), 13)
    ids[:, 1] = 0
    with pytest.raises(UserError, match="outside the teacher vocabulary"):
        compute_objective("uld", s, TeacherSignal.topk(ids, torch.full(ids.shape, -2.0), cross=cross), labels)
    assert get_objective("uld").cross_vocab and not get_objective("fkl").cross_vocab


# ---------------------------------------------------------------------------------------------------------------
# Alignment on hand-made pieces
# ---------------------------------------------------------------------------------------------------------------


def test_alignment_merges_splits_and_unicode() -> None:
    eos = b"\x00eos\x00"
    a = [b"What", b" 23", b"+", b"4", b"=", b"27", b" caf", b"\xc3", b"\xa9", eos]  # merged digits, split e-acute
    b = [b"What", b" ", b"2", b"3", b"+", b"4", b"=", b"2", b"7", b" ca", b"f\xc3\xa9", eos]
    spans = align(a, b)
    assert spans == [Span(0, 1, 0, 1), Span(1, 2, 1, 4), Span(2, 3, 4, 5), Span(3, 4, 5, 6), Span(4, 5, 6, 7),
                     Span(5, 6, 7, 9), Span(6, 9, 9, 11), Span(9, 10, 11, 12)]
    pr = pair_positions(a, b, spans)
    assert pr.one_to_one == [True, False, True, True, True, False, False, False, False, True]
    # inside a longer span: the teacher token holding the student token's first byte
    assert pr.partner == [0, 1, 4, 5, 6, 7, 9, 10, 10, 11]
    assert pr.span == [0, 1, 2, 3, 4, 5, 6, 6, 6, 7]
    # the ULD paper's pairing: by index, as many as the shorter has
    pos = pair_positions(a, b, spans, "position")
    assert pos.partner == list(range(10)) and not any(pos.one_to_one)


def test_alignment_stops_where_the_texts_differ() -> None:
    a = [b"12", b"+", b"3", b"=", b"15"]
    b = [b"1", b"2", b"+", b"3", b"=", b"16"]
    spans = align(a, b)
    assert spans == [Span(0, 1, 0, 2), Span(1, 2, 2, 3), Span(2, 3, 3, 4), Span(3, 4, 4, 5)]
    pr = pair_positions(a, b, spans)
    assert pr.partner[-1] == -1 and pr.span[-1] == -1
    assert align([], b) == [] and align(a, []) == []


def test_special_tokens_pair_by_role(tmp_path) -> None:
    """A student whose end of sequence is <|endoftext|> and a teacher whose end is <|im_end|>: both are the eos
    marker, so they pair one-to-one and map to each other; specials stand for no text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def make(vocab: dict[str, int], eos: str) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
        fast.add_special_tokens({"eos_token": eos})
        return fast

    s = make({"<unk>": 0, "a": 1, "b": 2}, "<|endoftext|>")
    t = make({"<unk>": 0, "b": 1, "c": 2, "a": 3}, "<|im_end|>")
    ts, tt = token_table(s), token_table(t)
    assert ts.pieces[s.eos_token_id] == tt.pieces[t.eos_token_id] == b"\x00eos\x00"
    vm = vocab_map(tt, ts)
    assert int(vm[t.eos_token_id]) == s.eos_token_id and int(vm[3]) == 1 and int(vm[1]) == 2 and int(vm[2]) == -1
    assert int(vm[0]) == 0  # unk <-> unk, by role


def test_builtin_tokenizers_pieces_and_map(task_tok) -> None:
    from distillarena.models.presets import load_tokenizer

    merged = load_tokenizer("builtin:merged-digits")
    assert len(merged) != len(task_tok) and merged.eos_token_id != task_tok.eos_token_id
    text = "What is the sum of 23 and 4?\n23+4=27\nAnswer: 27 naïve 😀"
    for tok in (task_tok, merged):
        table = token_table(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table.piece(i) for i in ids) == text.encode()  # pieces are the exact bytes
    assert len(merged(text)["input_ids"]) < len(task_tok(text)["input_ids"])  # numbers merge
    vm = vocab_map(token_table(task_tok), token_table(merged))
    mapped = vm[vm >= 0]
    assert mapped.numel() == mapped.unique().numel() and int(vm[task_tok.eos_token_id]) == merged.eos_token_id
    with pytest.raises(UserError, match="unknown built-in tokenizer"):
        load_tokenizer("builtin:nope")


def test_retokenize_keeps_text_and_eos(task_tok) -> None:
    from distillarena.models.presets import load_tokenizer
    from distillarena.teachers.cross import retokenize

    merged = load_tokenizer("builtin:merged-digits")
    ids = task_tok("12+7=19\nAnswer: 19", add_special_tokens=False)["input_ids"] + [task_tok.eos_token_id]
    out = retokenize(ids, task_tok, merged)
    assert out[-1] == merged.eos_token_id
    assert merged.decode(out[:-1]) == "12+7=19\nAnswer: 19"
    assert retokenize([], task_tok, merged) == []


# ---------------------------------------------------------------------------------------------------------------
# The lined-up teacher signal and the run
# ---------------------------------------------------------------------------------------------------------------


def test_cross_teacher_gathers_the_partner_rows(tiny_teacher, task_tok) -> None:
    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.tasks.data import Example, collate, encode_example
    from distillarena.teachers import LocalTeacher
    from distillarena.teachers.cross import CrossTokenizerTeacher

    merged = load_tokenizer("builtin:merged-digits")
    teacher = LocalTeacher(load_model(str(tiny_teacher)), task_tok)
    exs = [Example(prompt="What is 23+45?\n", completion="23+45=68\nAnswer: 68"),
           Example(prompt="What is 7*8?\n", completion="7*8=56\nAnswer: 56")]
    s_enc = [encode_example(merged, e) for e in exs]
    t_enc = [encode_example(task_tok, e) for e in exs]
    batch = collate(s_enc, merged.pad_token_id)
    batch["teacher_batch"] = collate(t_enc, task_tok.pad_token_id)
    cross = CrossTokenizerTeacher(teacher, merged, task_tok)
    sig = cross.signal(batch)
    own = teacher.signal(batch["teacher_batch"])
    c = sig.cross
    s_lab, t_lab = batch["labels"][:, 1:], batch["teacher_batch"]["labels"][:, 1:]
    valid = s_lab != -100
    assert bool((c.paired == valid).all())  # every completion token has a partner
    assert 0 < int(c.matched.sum()) < int(valid.sum())
    # a matched position's row is the teacher's row that predicts the same token, and its span log-prob is that
    # token's log-prob; the eos pairs with eos
    b, p = c.matched.nonzero()[0].tolist()
    tp = ((t_lab[b] != -100).nonzero().squeeze(-1))
    rows = own.head.hidden[b, tp]
    hit = (rows - sig.head.hidden[b, p]).abs().sum(-1).argmin()
    assert int(t_lab[b, tp[hit]]) == int((cross.pair.vocab_map == s_lab[b, p]).nonzero()[0, 0])
    z = (own.head.hidden[b, tp[hit]] @ own.head.weight.T).log_softmax(-1)
    assert abs(float(c.span_logprob[b, p]) - float(z[t_lab[b, tp[hit]]])) < 1e-5
    last = valid[0].nonzero()[-1, 0]
    assert bool(c.matched[0, last]) and int(s_lab[0, last]) == merged.eos_token_id
    # the " 68"-like merged number: its span log-prob is the sum over the teacher's digit tokens
    assert bool(((c.paired & ~c.matched).sum()) > 0)
    out = compute_objective("aligned", torch.randn(*s_lab.shape, len(merged), dtype=torch.float32), sig, s_lab,
                            merged_weight=1.0)
    assert math.isfinite(float(out.loss_sum)) and out.count == int(valid.sum())


def test_api_records_signal(task_tok) -> None:
    from distillarena.teachers.cross import api_records_signal

    records = [{"id": "a", "prompt": "What is 12+7?\n", "choices": [{
        "text": "12+7=19", "tokens": ["12", "+", "7", "=", "19"], "token_logprobs": [-0.1, -0.2, -0.3, -0.1, -0.5],
        "top_logprobs": [[["12", -0.1], ["1", -2.5]], [["+", -0.2], ["-", -1.9]], [["7", -0.3], ["8", -1.5]],
                         [["=", -0.1]], [["19", -0.5], ["1", -1.1]]]}]}]
    batch, sig = api_records_signal(records, task_tok)
    c = sig.cross
    s_lab = batch["labels"][:, 1:]
    assert task_tok.decode(s_lab[s_lab != -100]) == "12+7=19"
    assert bool((c.paired == (s_lab != -100)).all())
    # "+", "7", "=" are one-to-one; the digits of "12" and "19" sit inside longer spans
    toks = task_tok.convert_ids_to_tokens(s_lab[0][s_lab[0] != -100].tolist())
    assert [bool(x) for x in c.matched[0][s_lab[0] != -100]] == [t in "+7=" for t in toks]
    out = compute_objective("aligned", torch.zeros(*s_lab.shape, len(task_tok)), sig, s_lab, merged_weight=1.0)
    assert math.isfinite(float(out.loss_sum))
    with pytest.raises(UserError, match="top_logprobs"):
        api_records_signal([{"id": "x", "prompt": "p", "choices": [{"text": "t", "tokens": None,
                                                                     "top_logprobs": None}]}], task_tok)


def _cfg(teacher_path, **kw):
    from distillarena.train.config import DistillConfig

    base = {"teacher": {"path": str(teacher_path)},
            "student": {"preset": "tiny", "tokenizer": "builtin:merged-digits"}, "cross_tokenizer": {},
            "data": {"train_size": 32}, "train": {"steps": 2, "batch_size": 8, "eval_every": 0, "log_every": 1},
            "eval": {"n_examples": 4, "n_problems": 2, "difficulties": [1]}, "max_new_tokens": 16}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return DistillConfig.model_validate(base)


@pytest.mark.parametrize("objective,extra", [("aligned", {"lmbda": 0.5}), ("uld", {"seq_kd": True}),
                                             ("sft", {"seq_kd": True})])
def test_distill_cross_tokenizer_end_to_end(tiny_teacher, tmp_path, objective, extra) -> None:
    import json

    from distillarena.recipes.distill import run_distill

    cfg = _cfg(tiny_teacher, objective=objective, **extra)
    res = run_distill(cfg, tmp_path / objective)
    final = res.summary["eval_final"]
    assert math.isfinite(final["heldout_nll"]) and "heldout_fkl" not in final
    recs = [json.loads(x) for x in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["phase"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    if objective != "sft":
        assert any(k.startswith(objective + "/") for k in train[-1])


def test_distill_cross_tokenizer_from_topk_cache(tiny_teacher, tmp_path) -> None:
    from distillarena.recipes.distill import run_cache_teacher, run_distill
    from distillarena.train.config import DistillConfig

    cache_cfg = DistillConfig.model_validate({"teacher": {"path": str(tiny_teacher)}, "data": {"train_size": 16}})
    run_cache_teacher(cache_cfg, tmp_path / "cache", k=8)
    cfg = _cfg(tiny_teacher, teacher={"cache": str(tmp_path / "cache")}, objective="aligned")
    cfg = cfg.model_copy(update={"data": cache_cfg.data})
    res = run_distill(cfg, tmp_path / "run")
    assert math.isfinite(res.summary["eval_final"]["heldout_nll"])
    assert "top-k cache" in res.summary["teacher"]


def test_cross_tokenizer_config_checks(tiny_teacher, tmp_path) -> None:
    import yaml

    from distillarena.core.config import load_config
    from distillarena.recipes.distill import run_distill
    from distillarena.train.config import DistillConfig

    with pytest.raises(UserError, match="uld, aligned"):
        run_distill(_cfg(tiny_teacher, objective="fkl"), tmp_path / "a")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"cross_tokenizer": {"pairing": "nearest"}}))
    with pytest.raises(UserError, match="pairing"):
        load_config(p, DistillConfig)
    # without cross_tokenizer, two tokenizers are refused, and the message says what to do
    cfg = _cfg(tiny_teacher, objective="uld").model_copy(update={"cross_tokenizer": None})
    with pytest.raises(UserError, match="cross_tokenizer"):
        run_distill(cfg, tmp_path / "b")


def test_beta_reaches_aligned_only_when_set() -> None:
    """aligned keeps its own beta (0: forward KL on matched spans) unless the config sets one; jsd keeps 0.5."""
    from distillarena.train.config import DistillConfig
    from distillarena.train.setup import resolve_stages

    def params(**kw):
        return resolve_stages(DistillConfig.model_validate(kw))[0].params

    assert params(objective="aligned")["beta"] == 0.0
    assert params(objective="aligned", beta=0.5)["beta"] == 0.5
    assert params(objective="jsd")["beta"] == 0.5
    assert params(objective="jsd", beta=0.2)["beta"] == 0.2
    staged = DistillConfig.model_validate({"objective": "aligned", "stages": [{"steps": 2, "beta": 1.0}]})
    assert resolve_stages(staged)[0].params["beta"] == 1.0
