"""Decoding-time defenses: PoE and antidistillation sampling (formulas, lockstep proxies, FD vs forward mode),
the proxy gradient file, reveal policies, and the errors on bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from distillarena.core.errors import UserError
from distillarena.decoding import apply_processors, positions_from_mask, sample, sample_from_probs
from distillarena.defenses import (
    AntidistillationProcessor,
    ProductOfExpertsProcessor,
    RevealNothing,
    RevealTopK,
    antidistillation_scores,
    compute_proxy_gradient,
    leading_pad_mask,
    load_proxy_gradient,
    log_softmax_jvp,
    product_of_experts,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

VOCAB = 512
PAD, EOS = 0, 1
# FD (eps = 1e-2, unit-norm g) vs forward mode on the fixture proxy, float32, 6 steps x 4 sequences: measured
# relative error (Frobenius) 8.4e-5 (7e-4 at eps = 3e-2, 2.8e-4 at eps = 1e-3, where rounding takes over)
FD_JVP_REL_TOL = 1e-3



def tiny_llama(hidden: int = 64, layers: int = 2, seed: int = 0, vocab: int = VOCAB, tied: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(tie_word_embeddings=tied, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(64, 2, seed=0)


@pytest.fixture(scope="module")
def proxy():
    return tiny_llama(32, 2, seed=1)


@pytest.fixture(scope="module")
def holdout():
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, VOCAB, (4, 14), generator=g)
        mask = torch.ones_like(ids)
        ids[0, :4], mask[0, :4] = PAD, 0  # a left-padded trace
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100  # completion-only loss
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.fixture(scope="module")
def gradient(proxy, holdout):
    return compute_proxy_gradient(proxy, holdout)


def ragged_prompts(batch=5, seed=1, max_len=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, max_len), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(batch):
        n = max_len - (i * 3) % max_len
        ids[i, max_len - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, max_len - n :] = 1
    return ids, mask


@torch.no_grad()
def full_logits(model, seq, am):
    return model(seq, attention_mask=am, position_ids=positions_from_mask(am)).logits[:, -1].float()


@torch.no_grad()
def reference_loop(teacher, ids, mask, scores_fn, n, generator):
    """No KV cache anywhere: teacher and proxies recomputed on the full sequence; same generator use as sample()."""
    seq, am = ids, mask
    out = []
    alive = torch.ones(ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        scores = scores_fn(seq, am, full_logits(teacher, seq, am))
        tok = sample_from_probs(torch.log_softmax(scores, -1).exp(), generator)
        tok = torch.where(alive, tok, torch.full_like(tok, PAD))
        alive &= tok != EOS
        out.append(tok)
        seq = torch.cat([seq, tok[:, None]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        if not alive.any():
            break
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------------
# Product-of-Experts


@settings(max_examples=40, deadline=None)
@given(gamma=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), scale=st.floats(0.1, 30.0))
def test_poe_equals_formula_on_random_logits(gamma, seed, scale):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(3, 50, generator=g) * scale
    z_p = torch.randn(3, 50, generator=g) * scale
    out = product_of_experts(z_t, z_p, gamma)
    torch.testing.assert_close(out, (1 - gamma) * z_t + gamma * z_p)
    if gamma == 0:
        assert torch.equal(out, z_t)


def test_poe_gamma_zero_is_exactly_the_undefended_teacher(teacher, proxy):
    ids, mask = ragged_prompts()
    z_t = torch.randn(4, VOCAB)
    assert torch.equal(product_of_experts(z_t, torch.randn(4, VOCAB), 0.0), z_t)
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, eos_token_id=EOS, pad_token_id=PAD)
    plain = sample(teacher, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    poe = sample(teacher, ids, mask, generator=torch.Generator().manual_seed(0),
                 processors=[ProductOfExpertsProcessor(proxy, 0.0, teacher=teacher)], **kw)
    assert torch.equal(plain.tokens, poe.tokens)
    assert torch.equal(plain.logprobs, poe.logprobs) and torch.equal(plain.kl, poe.kl)


@pytest.mark.parametrize("fast", [True, False])
def test_poe_sampler_equals_no_cache_reference(teacher, proxy, fast):
    ids, mask = ragged_prompts(6)
    gamma = 0.6
    res = sample(teacher, ids, mask, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD, fast=fast,
                 processors=[ProductOfExpertsProcessor(proxy, gamma, teacher=teacher, fast=fast)],
                 generator=torch.Generator().manual_seed(2))

    def scores_fn(seq, am, z_t):
        return (1 - gamma) * z_t + gamma * full_logits(proxy, seq, am)

    ref = reference_loop(teacher, ids, mask, scores_fn, 16, torch.Generator().manual_seed(2))
    assert torch.equal(res.tokens, ref)
    m = res.mask
    assert (res.kl[m] > 0).all()  # the defended distribution differs from the teacher's


def test_poe_inside_generate_follows_batches(teacher, proxy):
    """In model.generate the processor infers the prompt mask from pad_token_id and resets on each new batch."""
    poe = ProductOfExpertsProcessor(proxy, 0.5, teacher=teacher, pad_token_id=PAD)
    for seed in (1, 2):  # two batches of different shapes through the same processor
        ids, mask = ragged_prompts(4 + seed, seed=seed)
        out = teacher.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([poe]),
                               do_sample=False, max_new_tokens=8, pad_token_id=PAD, eos_token_id=EOS)
        res = sample(teacher, ids, mask, max_new_tokens=8, temperature=0, eos_token_id=EOS, pad_token_id=PAD,
                     processors=[ProductOfExpertsProcessor(proxy, 0.5, teacher=teacher)])
        gen = out[:, ids.shape[1] :]
        assert torch.equal(res.tokens[:, : gen.shape[1]], gen)
    assert poe.proxy_forwards > 0


def test_poe_explicit_begin_before_generate(teacher, proxy):
    ids, mask = ragged_prompts(4, seed=3)
    poe = ProductOfExpertsProcessor(proxy, 0.5, teacher=teacher)  # no pad id: told the mask instead
    poe.begin(ids, mask)
    out = teacher.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([poe]), do_sample=False,
                           max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS)
    res = sample(teacher, ids, mask, max_new_tokens=6, temperature=0, eos_token_id=EOS, pad_token_id=PAD,
                 processors=[ProductOfExpertsProcessor(proxy, 0.5)])
    assert torch.equal(res.tokens[:, : out.shape[1] - ids.shape[1]], out[:, ids.shape[1] :])


def test_leading_pad_mask():
    ids = torch.tensor([[0, 0, 5, 0, 7], [3, 0, 4, 4, 4]])
    assert leading_pad_mask(ids, 0).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert leading_pad_mask(ids, None).tolist() == [[1] * 5] * 2


class FakeTokenizer:
    def __init__(self, vocab):
        self._vocab = vocab
        self.all_special_tokens = ["<pad>"]

    def get_vocab(self):
        return dict(self._vocab)


@pytest.mark.parametrize("gamma", [-0.1, 1.2, float("nan")])
def test_poe_bad_gamma(proxy, gamma):
    with pytest.raises(UserError, match="gamma"):
        ProductOfExpertsProcessor(proxy, gamma)


def test_poe_proxy_with_other_vocab_or_tokenizer(teacher):
    other = tiny_llama(32, 1, seed=3, vocab=600)
    with pytest.raises(UserError, match="vocabulary"):
        ProductOfExpertsProcessor(other, 0.5, teacher=teacher)
    poe = ProductOfExpertsProcessor(other, 0.5)  # no teacher given: caught at the first call
    with pytest.raises(UserError, match="vocabulary"):
        poe(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, VOCAB))
    same = tiny_llama(32, 1, seed=3)
    with pytest.raises(UserError, match="tokenizer"):
        ProductOfExpertsProcessor(same, 0.5, teacher=teacher, teacher_tokenizer=FakeTokenizer({"a": 0, "b": 1}),
                                  proxy_tokenizer=FakeTokenizer({"a": 0, "c": 1}))
    ProductOfExpertsProcessor(same, 0.5, teacher=teacher, teacher_tokenizer=FakeTokenizer({"a": 0}),
                              proxy_tokenizer=FakeTokenizer({"a": 0}))


# ---------------------------------------------------------------------------------------------------------------
# Antidistillation sampling


def test_ads_formula():
    z, b = torch.randn(2, 30), torch.randn(2, 30)
    torch.testing.assert_close(antidistillation_scores(z, b, 0.3, 0.9), z / 0.9 + 0.3 * b)
    assert torch.equal(antidistillation_scores(z, b, 0.0, 0.9), z / 0.9)


@pytest.mark.parametrize("fast", [True, False])
def test_fd_and_forward_mode_penalties_agree(proxy, gradient, fast):
    ids, mask = ragged_prompts(4)
    jvp_ads = AntidistillationProcessor(proxy, gradient, 1.0, method="jvp", fast=fast)
    fd_ads = AntidistillationProcessor(proxy, gradient, 1.0, method="fd", eps=1e-2, fast=fast)
    for p in (jvp_ads, fd_ads):
        p.begin(ids, mask, 6)
    seq = ids
    b_jvp, b_fd = [], []
    for step in range(6):
        b_jvp.append(jvp_ads.penalty(seq))
        b_fd.append(fd_ads.penalty(seq))
        nxt = torch.randint(3, VOCAB, (4, 1), generator=torch.Generator().manual_seed(step))
        seq = torch.cat([seq, nxt], 1)
    b_jvp, b_fd = torch.stack(b_jvp), torch.stack(b_fd)
    rel = float((b_fd - b_jvp).norm() / b_jvp.norm())
    assert b_jvp.abs().max() > 1e-3  # a non-trivial penalty
    assert rel < FD_JVP_REL_TOL, rel
    assert fd_ads.proxy_forwards == 2 * 6 and jvp_ads.proxy_forwards == 6


def tiny_gpt2(seed: int = 4):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=2,
                     eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "llama_tied_generic", "gpt2"])
def test_forward_mode_through_kv_cache_equals_jvp_on_full_sequence(proxy, gradient, holdout, kind):
    """The cached forward-mode penalty equals torch.func.jvp of the no-cache proxy on the whole sequence
    (fast Llama path, tied embeddings, and the generic path over Llama and GPT-2)."""
    fast = None
    if kind != "llama":
        proxy = tiny_gpt2() if kind == "gpt2" else tiny_llama(32, 2, seed=5, tied=True)
        gradient = compute_proxy_gradient(proxy, holdout)
        fast = False if kind == "llama_tied_generic" else None
    ids, mask = ragged_prompts(3)
    direction = gradient.direction("unit")
    params = dict(proxy.named_parameters())
    ads = AntidistillationProcessor(proxy, gradient, 1.0, method="jvp", fast=fast)
    ads.begin(ids, mask, 4)
    seq, am = ids, mask
    for step in range(4):
        cached = ads.penalty(seq)

        def logp(p, seq=seq, am=am):
            out = functional_call(proxy, p, (seq,), {"attention_mask": am, "position_ids": positions_from_mask(am)})
            return torch.log_softmax(out.logits[:, -1], -1)

        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            _, exact = jvp(logp, ({k: v.detach() for k, v in params.items()},), (direction,))
        torch.testing.assert_close(cached, exact, atol=2e-5, rtol=1e-4)
        nxt = torch.randint(3, VOCAB, (3, 1), generator=torch.Generator().manual_seed(10 + step))
        seq = torch.cat([seq, nxt], 1)
        am = torch.cat([am, torch.ones_like(nxt)], 1)


def test_log_softmax_jvp_matches_autograd():
    z, dz = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    _, exact = jvp(lambda x: torch.log_softmax(x, -1), (z,), (dz,))
    torch.testing.assert_close(log_softmax_jvp(z, dz), exact.float())


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_ads_lambda_zero_is_exactly_temperature_sampling(teacher, proxy, gradient, method):
    ids, mask = ragged_prompts()
    kw = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, top_p=0.95)
    plain = sample(teacher, ids, mask, temperature=0.7, generator=torch.Generator().manual_seed(5), **kw)
    ads = sample(teacher, ids, mask, generator=torch.Generator().manual_seed(5),
                 processors=[AntidistillationProcessor(proxy, gradient, 0.0, temperature=0.7, method=method)], **kw)
    assert torch.equal(plain.tokens, ads.tokens)
    assert torch.equal(plain.logprobs, ads.logprobs) and torch.equal(plain.kl, ads.kl)


def test_ads_sampler_equals_no_cache_reference(teacher, proxy, gradient):
    ids, mask = ragged_prompts(5)
    lam, tau = 0.5, 0.8
    res = sample(teacher, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD,
                 processors=[AntidistillationProcessor(proxy, gradient, lam, temperature=tau, method="jvp")],
                 generator=torch.Generator().manual_seed(8))
    direction = gradient.direction("unit")
    params = {k: v.detach() for k, v in proxy.named_parameters()}

    def scores_fn(seq, am, z_t):
        def logp(p):
            out = functional_call(proxy, p, (seq,), {"attention_mask": am, "position_ids": positions_from_mask(am)})
            return torch.log_softmax(out.logits[:, -1], -1)

        with sdpa_kernel([SDPBackend.MATH]):
            _, b = jvp(logp, (params,), (direction,))
        return z_t / tau + lam * b

    ref = reference_loop(teacher, ids, mask, scores_fn, 10, torch.Generator().manual_seed(8))
    assert torch.equal(res.tokens, ref)
    assert res.mean_kl() > 0


def test_ads_refuses_a_second_temperature(teacher, proxy, gradient):
    ads = AntidistillationProcessor(proxy, gradient, 0.1, temperature=0.7)
    with pytest.raises(UserError, match="temperature"):
        sample(teacher, *ragged_prompts(2), max_new_tokens=2, temperature=0.7, processors=[ads])


@pytest.mark.parametrize("bad", [dict(lam=float("nan")), dict(temperature=0.0), dict(temperature=-1.0),
                                 dict(method="exact"), dict(eps=0.0)])
def test_ads_bad_arguments(proxy, gradient, bad):
    kw = dict(lam=0.1) | bad
    with pytest.raises(UserError):
        AntidistillationProcessor(proxy, gradient, **kw)


def test_ads_proxy_with_other_vocab(teacher, gradient):
    other = tiny_llama(32, 1, seed=3, vocab=600)
    with pytest.raises(UserError, match="vocabulary"):
        AntidistillationProcessor(other, gradient, 0.1, teacher=teacher)


# ---------------------------------------------------------------------------------------------------------------
# The proxy gradient file


def test_gradient_is_the_mean_per_trace_loss_gradient(proxy, holdout, gradient):
    """Accumulated over batches == autograd of the mean per-trace NLL on all traces at once (batch-size free)."""
    ids = torch.cat([b["input_ids"] for b in holdout])
    mask = torch.cat([b["attention_mask"] for b in holdout])
    labels = torch.cat([b["labels"] for b in holdout])
    logits = proxy(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    tgt = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp(min=0), reduction="none")
    scored = tgt != -100
    loss = ((nll * scored).sum(-1) / scored.sum(-1)).mean()
    params = dict(proxy.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, _), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(gradient.grads[name], g, atol=1e-6, rtol=1e-4)
    assert abs(gradient.metadata["loss"] - float(loss.detach())) < 1e-4
    assert gradient.metadata["traces"] == 8
    assert all(p.grad is None for p in proxy.parameters())
    unit = gradient.direction("unit")
    assert abs(sum(float(v.pow(2).sum()) for v in unit.values()) - 1.0) < 1e-5


def test_gradient_file_roundtrip_and_mismatch(tmp_path, proxy, holdout, gradient):
    path = tmp_path / "g" / "proxy_grad.safetensors"
    compute_proxy_gradient(proxy, holdout, path=path)
    loaded = load_proxy_gradient(path, proxy)
    assert loaded.proxy_fingerprint == gradient.proxy_fingerprint and loaded.norm == pytest.approx(gradient.norm)
    for k, v in gradient.grads.items():
        torch.testing.assert_close(loaded.grads[k], v)
    assert loaded.metadata["holdout_fingerprint"] == gradient.metadata["holdout_fingerprint"]
    # a processor built from the path works
    AntidistillationProcessor(proxy, path, 0.1, method="jvp")

    other = tiny_llama(32, 2, seed=99)  # same architecture, other weights
    with pytest.raises(UserError, match="another proxy"):
        load_proxy_gradient(path, other)
    with pytest.raises(UserError, match="another proxy"):
        AntidistillationProcessor(other, path, 0.1)
    with pytest.raises(UserError, match="another proxy"):
        AntidistillationProcessor(other, gradient, 0.1)
    with pytest.raises(UserError, match="no proxy gradient file"):
        load_proxy_gradient(tmp_path / "missing.safetensors", proxy)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError):
        load_proxy_gradient(tmp_path / "junk.safetensors", proxy)


# ---------------------------------------------------------------------------------------------------------------
# Reveal policies


def test_reveal_policies(teacher):
    ids, mask = ragged_prompts(3)
    lp = torch.log_softmax(torch.randn(3, 40), -1)
    ids_k, vals = RevealTopK(5, decimals=2)(lp)
    ref_vals, ref_ids = lp.topk(5)
    assert torch.equal(ids_k, ref_ids)
    assert torch.equal(vals, torch.round(ref_vals, decimals=2))
    a = RevealTopK(5, noise_std=0.1, seed=3)(lp)[1]
    b = RevealTopK(5, noise_std=0.1, seed=3)(lp)[1]
    assert torch.equal(a, b) and not torch.equal(a, ref_vals)
    assert RevealNothing()(lp) is None
    res = sample(teacher, ids, mask, max_new_tokens=4, reveal=RevealNothing(), eos_token_id=None)
    assert res.top_ids is None
    res = sample(teacher, ids, mask, max_new_tokens=4, reveal=RevealTopK(3, decimals=1), top_k=2,
                 eos_token_id=None, generator=torch.Generator().manual_seed(0))
    assert res.top_logprobs.shape == (3, 4, 3)
    assert torch.isinf(res.top_logprobs[..., 2]).all()  # top_k=2 sampled: the third revealed token is excluded
    rounded = res.top_logprobs[..., :2]
    assert torch.equal(rounded, torch.round(rounded, decimals=1))
    with pytest.raises(UserError):
        RevealTopK(0)
    with pytest.raises(UserError):
        RevealTopK(3, noise_std=-1.0)


def test_processors_chain_order_is_documented_order(teacher, proxy):
    """PoE runs before the sampler's temperature: sampled = softmax(((1-g) z_T + g z_P) / tau)."""
    ids, mask = ragged_prompts(2)
    poe = ProductOfExpertsProcessor(proxy, 0.4)
    z_t = full_logits(teacher, ids, mask)
    expected = torch.log_softmax(((1 - 0.4) * z_t + 0.4 * full_logits(proxy, ids, mask)) / 0.5, -1)
    res = sample(teacher, ids, mask, max_new_tokens=1, temperature=0.5, processors=[poe], reveal=VOCAB,
                 eos_token_id=None, generator=torch.Generator().manual_seed(0))
    got = torch.full((2, VOCAB), float("nan")).scatter(-1, res.top_ids[:, 0], res.top_logprobs[:, 0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert callable(apply_processors)
