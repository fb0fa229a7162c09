"""The KV-cached sampler against a no-cache reference loop, the processors against Hugging Face's, stop rules."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from distillarena.core.errors import UserError
from distillarena.decoding import (
    HFDecoder,
    LlamaDecoder,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    apply_processors,
    cut_at_stop_strings,
    make_decoder,
    positions_from_mask,
    sample,
    sample_from_probs,
    sampling_warpers,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

VOCAB = 512
PAD, EOS = 0, 1



def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               tied: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        tie_word_embeddings=tied,
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    # sharpen the random model a little so sequences differ and EOS shows up sometimes
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[EOS] += 0.15
    return model


def tiny_gpt2(seed: int = 0):
    """A model with absolute position embeddings and no fast path: exercises the generic decoder."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=2,
                     eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def ragged_prompts(batch: int = 5, seed: int = 1, max_len: int = 9):
    g = torch.Generator().manual_seed(seed)
    lens = [max_len - (i * 3) % max_len for i in range(batch)]
    ids = torch.full((batch, max_len), PAD, dtype=torch.long)
    mask = torch.zeros(batch, max_len, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, max_len - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, max_len - n :] = 1
    return ids, mask


@torch.no_grad()
def reference_loop(model, ids, mask, *, max_new_tokens, temperature=1.0, top_k=None, top_p=None, processors=(),
                   generator=None, eos=(EOS,), pad=PAD):
    """No KV cache: recompute the whole sequence every step; same generator consumption as the sampler."""
    chain = list(processors) + sampling_warpers(1.0 if temperature == 0 else temperature, top_k, top_p)
    seq, am = ids.clone(), mask.clone()
    alive = torch.ones(ids.shape[0], dtype=torch.bool)
    out, teacher_lp = [], []
    for _ in range(max_new_tokens):
        logits = model(seq, attention_mask=am, position_ids=positions_from_mask(am)).logits[:, -1].float()
        scores = apply_processors(chain, seq, logits)
        if temperature == 0:
            tok = scores.argmax(-1)
        else:
            tok = sample_from_probs(torch.log_softmax(scores, -1).exp(), generator)
        tok = torch.where(alive, tok, torch.full_like(tok, pad))
        out.append(tok)
        teacher_lp.append(torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1))
        alive &= ~torch.isin(tok, torch.tensor(eos))
        seq = torch.cat([seq, tok[:, None]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        if not alive.any():
            break
    return torch.stack(out, 1), torch.stack(teacher_lp, 1)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
def test_decoder_logits_match_full_forward(model, fast):
    ids, mask = ragged_prompts()
    dec = LlamaDecoder(model) if fast else HFDecoder(model)
    logits = dec.prefill(ids, mask, 6)
    seq, am = ids, mask
    for step in range(6):
        with torch.no_grad():
            ref = model(seq, attention_mask=am, position_ids=positions_from_mask(am)).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
        nxt = torch.randint(3, VOCAB, (ids.shape[0],), generator=torch.Generator().manual_seed(step))
        seq = torch.cat([seq, nxt[:, None]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        logits = dec.step(nxt)


@pytest.mark.parametrize("kind", ["llama_tied_mha", "gpt2"])
def test_other_architectures_cached_equals_no_cache(kind):
    m = tiny_llama(48, 2, heads=4, kv_heads=4, seed=3, tied=True) if kind.startswith("llama") else tiny_gpt2()
    assert type(make_decoder(m)).__name__ == ("LlamaDecoder" if kind.startswith("llama") else "HFDecoder")
    ids, mask = ragged_prompts(batch=5)
    res = sample(m, ids, mask, max_new_tokens=16, temperature=0.9, top_p=0.9, eos_token_id=EOS, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(11))
    ref, ref_lp = reference_loop(m, ids, mask, max_new_tokens=16, temperature=0.9, top_p=0.9,
                                 generator=torch.Generator().manual_seed(11))
    assert torch.equal(res.tokens, ref)
    torch.testing.assert_close(res.teacher_logprobs, torch.where(res.mask, ref_lp, 0.0), atol=5e-5, rtol=1e-5)


def test_left_padding_does_not_change_logits(model):
    ids, mask = ragged_prompts()
    dec = LlamaDecoder(model)
    batched = dec.prefill(ids, mask, 1)
    for i in range(ids.shape[0]):
        alone = ids[i : i + 1, mask[i].bool()]
        single = HFDecoder(model).prefill(alone, None, 1)
        torch.testing.assert_close(batched[i : i + 1], single, atol=2e-5, rtol=1e-5)


def test_decoder_grows_past_announced_capacity(model):
    ids, mask = ragged_prompts(batch=2)
    for dec in (LlamaDecoder(model), HFDecoder(model)):
        dec.prefill(ids, mask, 1)
        for _ in range(ids.shape[1] + 4):  # more steps than capacity
            logits = dec.step(torch.full((2,), 7))
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("settings", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40, top_p=0.9),
    dict(temperature=0.0),
])
def test_cached_sampler_equals_no_cache_reference(model, fast, settings):
    ids, mask = ragged_prompts(batch=6)
    res = sample(model, ids, mask, max_new_tokens=24, generator=torch.Generator().manual_seed(3), fast=fast,
                 eos_token_id=EOS, pad_token_id=PAD, **settings)
    ref_tokens, ref_teacher_lp = reference_loop(model, ids, mask, max_new_tokens=24,
                                                generator=torch.Generator().manual_seed(3), **settings)
    assert torch.equal(res.tokens, ref_tokens)
    torch.testing.assert_close(res.teacher_logprobs, torch.where(res.mask, ref_teacher_lp, 0.0),
                               atol=5e-5, rtol=1e-5)


def test_result_bookkeeping(model):
    ids, mask = ragged_prompts(batch=8)
    res = sample(model, ids, mask, max_new_tokens=30, generator=torch.Generator().manual_seed(0),
                 eos_token_id=EOS, pad_token_id=PAD, reveal=5)
    b, t = res.tokens.shape
    assert res.logprobs.shape == res.teacher_logprobs.shape == res.kl.shape == (b, t)
    assert res.top_ids.shape == res.top_logprobs.shape == (b, t, 5)
    assert res.finished.any(), "the sharpened EOS should end some sequences"
    for i in range(b):
        n = int(res.lengths[i])
        if res.finished[i]:
            assert res.tokens[i, n - 1] == EOS and (res.tokens[i, : n - 1] != EOS).all()
        else:
            assert n == 30
        assert (res.tokens[i, n:] == PAD).all()
        assert (res.logprobs[i, n:] == 0).all() and (res.kl[i, n:] == 0).all()
    # no processor, temperature 1: the sampled distribution is the undefended one
    m = res.mask
    torch.testing.assert_close(res.logprobs[m], res.teacher_logprobs[m])
    assert res.kl[m].abs().max() < 1e-5
    # the revealed top-k of the sampled distribution contains the argmax, sorted
    assert (res.top_logprobs[m][:, :-1] >= res.top_logprobs[m][:, 1:]).all()
    assert res.sequences().shape == (b, ids.shape[1] + t)


def test_kl_and_logprobs_under_truncation(model):
    ids, mask = ragged_prompts(batch=4)
    res = sample(model, ids, mask, max_new_tokens=10, temperature=0.8, top_k=20,
                 generator=torch.Generator().manual_seed(1), eos_token_id=None)
    m = res.mask
    assert (res.kl[m] > 0).all()
    assert (res.logprobs[m] >= res.teacher_logprobs[m]).all()  # truncation + T<1 sharpen
    assert res.mean_kl() > 0 and math.isfinite(res.mean_logratio())
    # KL from the sampler equals KL recomputed from the reference distribution at the first step
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
    lp_t = torch.log_softmax(logits, -1)
    lp_s = torch.log_softmax(TopKProcessor(20)(ids, logits / 0.8), -1)
    p_s = lp_s.exp()
    kl0 = torch.where(p_s > 0, p_s * (lp_s - lp_t), 0.0).sum(-1)
    torch.testing.assert_close(res.kl[:, 0], kl0, atol=1e-5, rtol=1e-4)


def test_greedy_kl_is_point_mass(model):
    ids, mask = ragged_prompts(batch=3)
    res = sample(model, ids, mask, max_new_tokens=5, temperature=0, eos_token_id=None)
    assert (res.logprobs == 0).all()
    torch.testing.assert_close(res.kl, -res.teacher_logprobs)


def test_sampling_frequencies_match_distribution():
    """Chi-square goodness of fit of sample_from_probs on a fixed distribution with zero-probability entries."""
    probs = torch.tensor([0.5, 0.2, 0.0, 0.15, 0.1, 0.05, 0.0])
    n = 40_000
    g = torch.Generator().manual_seed(123)
    draws = sample_from_probs(probs.expand(n, -1).contiguous(), g)
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[2] == 0 and counts[6] == 0
    keep = probs > 0
    expected = probs[keep].double() * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 4 degrees of freedom is 18.47


def test_sampler_token_frequencies_match_model_distribution(model):
    """The first sampled token of many copies of one prompt follows softmax(top-k(logits / T))."""
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5)).expand(4000, -1)
    res = sample(model, ids, max_new_tokens=1, temperature=1.3, top_k=8, eos_token_id=None,
                 generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(ids[:1]).logits[0, -1]
    p = torch.softmax(TopKProcessor(8)(ids[:1], logits[None] / 1.3), -1)[0]
    support = p > 0
    counts = torch.bincount(res.tokens[:, 0], minlength=VOCAB).double()
    assert counts[~support].sum() == 0
    expected = p[support].double() * 4000
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 26.1  # 99.9% quantile, 7 degrees of freedom: 24.3


# ---------------------------------------------------------------------------------------------------------------
def test_processors_equal_hugging_face_warpers():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=g) * 3
    ids = torch.zeros(6, 4, dtype=torch.long)
    assert torch.equal(TemperatureProcessor(0.7)(ids, scores), TemperatureLogitsWarper(0.7)(ids, scores))
    assert torch.equal(TopKProcessor(17)(ids, scores), TopKLogitsWarper(17)(ids, scores))
    for p in (0.05, 0.5, 0.95):
        assert torch.equal(TopPProcessor(p)(ids, scores), TopPLogitsWarper(p)(ids, scores))


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0.5), dict(max_new_tokens=0),
    dict(stop_strings=["x"]), dict(reveal=0),
])
def test_bad_sampler_arguments_are_user_errors(model, bad):
    ids, mask = ragged_prompts(batch=2)
    kwargs = dict(max_new_tokens=2) | bad
    with pytest.raises(UserError):
        sample(model, ids, mask, **kwargs)


def test_bad_processor_arguments_are_user_errors():
    with pytest.raises(UserError, match="temperature"):
        TemperatureProcessor(0)
    with pytest.raises(UserError, match="top_p"):
        TopPProcessor(1.01)
    with pytest.raises(UserError, match="top_k"):
        TopKProcessor(0)


def test_right_padded_prompts_are_rejected(model):
    ids, mask = ragged_prompts(batch=3)
    with pytest.raises(UserError, match="left-padded"):
        sample(model, ids, mask.flip(1), max_new_tokens=2)


def test_same_processors_inside_generate(model):
    """Our processors plug into model.generate; greedy generate equals our greedy sampler."""
    ids, mask = ragged_prompts(batch=4)
    procs = LogitsProcessorList([TopKProcessor(5)])
    out = model.generate(ids, attention_mask=mask, logits_processor=procs, do_sample=False, max_new_tokens=8,
                         pad_token_id=PAD, eos_token_id=EOS)
    res = sample(model, ids, mask, max_new_tokens=8, temperature=0, processors=[TopKProcessor(5)],
                 eos_token_id=EOS, pad_token_id=PAD)
    gen = out[:, ids.shape[1]:]
    assert torch.equal(res.tokens[:, : gen.shape[1]], gen)


# ---------------------------------------------------------------------------------------------------------------
class CharTokenizer:
    """Just enough of a tokenizer for stop strings: id i <-> chr(ord('a') + i % 26), ids 0..2 special."""

    def __len__(self):
        return VOCAB

    def _piece(self, i):
        return "" if i < 3 else ("\n" if i % 26 == 0 else chr(ord("a") + i % 26))

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(self._piece(i) for i in row) for row in rows]


def test_stop_strings_end_sequences_and_texts_cut_there(model):
    tok = CharTokenizer()
    ids, mask = ragged_prompts(batch=8)
    free = sample(model, ids, mask, max_new_tokens=30, eos_token_id=None, generator=torch.Generator().manual_seed(4))
    texts = free.texts(tok)
    # pick a 2-char string that occurs in some but not all continuations
    stop = next(t[i : i + 2] for t in texts for i in range(len(t) - 1) if "\n" not in t[i : i + 2])
    res = sample(model, ids, mask, max_new_tokens=30, eos_token_id=None, stop_strings=[stop], tokenizer=tok,
                 generator=torch.Generator().manual_seed(4))
    for i, full in enumerate(texts):
        cut = res.texts(tok)[i]
        if stop in full:
            assert res.finished[i]
            assert cut == full[: full.index(stop)]
            assert res.texts(tok, keep_stop_string=True)[i].endswith(stop)
        else:
            assert not res.finished[i] and cut == full
    # identical tokens up to each end: stop strings do not change what is sampled
    assert torch.equal(torch.where(res.mask, free.tokens[:, : res.tokens.shape[1]], PAD), res.tokens)


def test_cut_at_stop_strings():
    assert cut_at_stop_strings("abc\nxyz###", ["###", "\n"]) == "abc"
    assert cut_at_stop_strings("abc\nxyz###", ["###", "\n"], keep=True) == "abc\n"
    assert cut_at_stop_strings("abc", ["z"]) == "abc"
