"""The green-list watermark: the keyed green lists, the exact binomial tail, the processor and its place in the
defense table (game configs, traces, server keys)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.defenses.policy import build_policy
from distillarena.defenses.spec import DEFENSES, check_defense, defense_label
from distillarena.defenses.watermark import (
    PairTally,
    WatermarkProcessor,
    WatermarkScheme,
    binomial_tail,
    z_score,
)


def test_green_lists_are_keyed_deterministic_and_a_gamma_share():
    s = WatermarkScheme("secret", gamma=0.25, context=2)
    m = s.green_mask((5, 7), 4096)
    assert m.dtype == bool and m.shape == (4096,)
    assert np.array_equal(m, WatermarkScheme("secret", 0.25, 2).green_mask((5, 7), 4096))  # no hidden state
    assert not np.array_equal(m, s.green_mask((7, 5), 4096))  # the window's order matters
    assert not np.array_equal(m, WatermarkScheme("other", 0.25, 2).green_mask((5, 7), 4096))
    # the vectorised mask and the one-pair test agree, for any token
    for t in (0, 1, 17, 4095, 10**6):
        assert s.is_green((5, 7), t) == bool(s.green_bits((5, 7), [t])[0])
        if t < 4096:
            assert s.is_green((5, 7), t) == m[t]
    # a gamma share: over 200 windows x 512 tokens the green fraction is within 4 standard errors of gamma
    bits = np.concatenate([s.green_mask((w,), 512) for w in range(200)])
    se = math.sqrt(0.25 * 0.75 / bits.size)
    assert abs(bits.mean() - 0.25) < 4 * se
    # the window of a position: the previous `context` tokens, none before the row's first real token
    assert s.window([9, 8, 7, 6], 3) == (8, 7) and s.window([9, 8, 7, 6], 1) == (9,)
    assert s.window([0, 0, 7, 6], 3, start=2) == (7,)


def test_pairs_are_independent_bernoulli_gamma():
    # the null distribution's premise: distinct pairs (same window or not) are independent coins with P(green) = gamma
    s = WatermarkScheme("k", gamma=0.5, context=1)
    a = np.array([s.is_green((w,), t) for w in range(300) for t in (3, 4)]).reshape(300, 2)
    # pairs sharing a window: P(both green) = gamma^2 (4 standard errors)
    both = (a[:, 0] & a[:, 1]).mean()
    assert abs(both - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 300)


@pytest.mark.parametrize("n,p", [(1, 0.5), (7, 0.25), (30, 0.5), (64, 0.1)])
def test_binomial_tail_is_exact(n, p):
    q = Fraction(p)
    for k in range(-1, n + 2):
        exact = sum(Fraction(math.comb(n, i)) * q**i * (1 - q) ** (n - i) for i in range(max(k, 0), n + 1))
        got, log10 = binomial_tail(k, n, p)
        assert got == pytest.approx(float(exact), rel=1e-9, abs=1e-300)
        if exact > 0:
            assert log10 == pytest.approx(math.log10(exact), rel=1e-9, abs=1e-12)


def test_binomial_tail_far_in_the_tail_and_bad_input():
    p, log10 = binomial_tail(5000, 5000, 0.5)
    assert p == 0.0 and log10 == pytest.approx(5000 * math.log10(0.5))  # underflows, the log does not
    assert binomial_tail(0, 0, 0.5) == (1.0, 0.0)
    with pytest.raises(ValueError):
        binomial_tail(1, 10, 1.0)
    assert z_score(75, 100, 0.5) == pytest.approx(5.0) and z_score(0, 0, 0.5) == 0.0


def test_pair_tally_scores_each_pair_once():
    t = PairTally(WatermarkScheme("k", 0.5, 2))
    first = t.add((1, 2), 3)
    assert first in (True, False)
    assert t.add((1, 2), 3) is None and t.add([1, 2], 3) is None  # the same coin
    assert t.add((1, 2), 4) is not None  # another token after the same window: another coin
    assert t.scored == 2 and t.offered == 4 and t.green == sum(t.scheme.is_green(w, x) for w, x in t.seen)


def test_processor_adds_delta_on_the_green_list():
    proc = WatermarkProcessor("k", delta=2.5, gamma=0.5, context=2)
    ids = torch.tensor([[4, 5, 6], [0, 9, 8]])
    scores = torch.randn(2, 50)
    out = proc(ids, scores)
    for row, w in ((0, (5, 6)), (1, (9, 8))):
        m = torch.from_numpy(proc.scheme.green_mask(w, 50))
        assert torch.allclose(out[row], scores[row] + 2.5 * m.float())
    assert torch.equal(WatermarkProcessor("k", delta=0.0)(ids, scores), scores)
    # with the prompt mask (the sampler's begin), a left-padded row's window stops at its first real token
    proc = WatermarkProcessor("k", delta=1.0, gamma=0.5, context=3)
    proc.begin(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    out = proc(ids, scores)
    assert torch.allclose(out[1], scores[1] + torch.from_numpy(proc.scheme.green_mask((9, 8), 50)).float())
    with pytest.raises(ValueError):
        WatermarkProcessor("k", delta=-1.0)
    with pytest.raises(ValueError):
        WatermarkScheme("", 0.5, 2)


def test_watermark_is_one_entry_of_the_defense_table():
    spec = DEFENSES["watermark"]
    assert spec.main == "delta" and not spec.needs_proxy
    assert set(spec.parameter_names()) >= {"delta", "gamma", "context", "key", "temperature", "top_p"}
    check_defense("watermark", {"delta": 2, "gamma": 0.25, "context": 3, "key": "s3cret"})
    check_defense("watermark", {"key": 1234})  # an integer key is its decimal string
    for bad, name in (({"gamma": 1.0}, "gamma"), ({"gamma": 0}, "gamma"), ({"delta": -1}, "delta"),
                      ({"context": 0}, "context"), ({"context": 2.5}, "context"), ({"key": ""}, "key"),
                      ({"context": True}, "context"), ({"color": 1}, "color")):
        with pytest.raises(ValueError, match=name):
            check_defense("watermark", bad)
    assert defense_label("watermark", {"delta": 2.0}) == "watermark(delta=2.0)"
    policy = build_policy("watermark", {"delta": 3, "key": "abc", "temperature": 0.7})
    (proc,) = policy.processors
    assert isinstance(proc, WatermarkProcessor) and proc.delta == 3.0 and proc.scheme.key == "abc"
    assert proc.scheme.context == DEFENSES["watermark"].params().context and policy.temperature == 0.7
    with pytest.raises(UserError, match="gamma"):
        build_policy("watermark", {"gamma": 2})


def test_server_key_policies_and_game_configs_take_it():
    from distillarena.game.config import GameConfig
    from distillarena.serve.config import PolicyConfig

    pol = PolicyConfig(defense="watermark", params={"delta": 2, "key": "k"})
    assert pol.freedom == "fixed"  # a request may not sample around the watermark
    assert PolicyConfig(defense="watermark", strength=4.0).params == {"delta": 4.0}
    cfg = GameConfig.model_validate({"defenses": [{"kind": "watermark", "strengths": [{"delta": 1}, {"delta": 2}]}]})
    assert cfg.defenses[0].at({"delta": 1}).label == "watermark(delta=1)"


def test_sampling_with_the_watermark_makes_green_text(tiny_teacher, task_tok):
    from distillarena.forensics import detect_text
    from distillarena.models.presets import load_model
    from distillarena.models.tokenizer import left_padding

    model = load_model(str(tiny_teacher))
    prompts = [f"What is {a}+{b}?\n" for a in range(8) for b in range(4)]
    texts = {}
    for kind, params in (("none", {}), ("watermark", {"delta": 4.0, "key": "k", "context": 2})):
        policy = build_policy(kind, params)
        with left_padding(task_tok):
            enc = task_tok(prompts, return_tensors="pt", padding=True)
        res = policy.sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                            generator=torch.Generator().manual_seed(0), eos_token_id=task_tok.eos_token_id,
                            pad_token_id=task_tok.pad_token_id)
        # score exactly the sampled tokens (the windows reach into each prompt, as the processor's did)
        texts[kind] = [(task_tok(p)["input_ids"] + res.tokens[i, : int(res.lengths[i])].tolist(),
                        len(task_tok(p)["input_ids"])) for i, p in enumerate(prompts)]
    scheme = WatermarkScheme("k", 0.5, 2)
    marked = detect_text(scheme, task_tok, texts["watermark"])
    clean = detect_text(scheme, task_tok, texts["none"])
    assert marked.green_fraction > 0.7 and marked.p_value < 1e-6
    assert clean.p_value > 1e-3
    assert detect_text(WatermarkScheme("other", 0.5, 2), task_tok, texts["watermark"]).p_value > 1e-3
