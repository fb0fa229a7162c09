"""The attacker's valuation: weights (normalisation, clipping, sign), the finite-difference value and the oracle
on closed-form cases, the rank correlation, and the sign on a language model (clean trace beats corrupted)."""

import math
import random

import pytest
import torch

from distillarena.attacks import (
    fd_values,
    holdout_direction,
    oracle_traces,
    oracle_values,
    ranks,
    spearman,
    top_fraction,
    value_traces,
    value_weights,
    weight_stats,
)
from distillarena.core.errors import UserError


class Point(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))


def quadratic_case():
    """L_H = ½‖θ − h‖², NLL_i = ½‖θ − t_i‖²: every quantity has a closed form."""
    model = Point([1.0, 2.0, -1.0])
    h = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, -2.0], [1.0, 0.0, 0.0], [5.0, -3.0, 2.0]], dtype=torch.float64)

    def holdout(m):
        yield 0.5 * (m.theta - h).pow(2).sum()

    def traces(m):
        return 0.5 * (m.theta[None] - t).pow(2).sum(-1)

    def step(m, i):
        return 0.5 * (m.theta - t[i]).pow(2).sum()

    return model, h, t, holdout, traces, step


def test_fd_value_is_the_directional_derivative_along_the_unit_holdout_gradient():
    model, h, t, holdout, traces, _ = quadratic_case()
    theta = model.theta.detach().clone()
    u, norm = holdout_direction(model, holdout)
    g = theta - h
    assert norm == pytest.approx(float(g.norm()))
    assert torch.allclose(u[0], g / g.norm())
    a = fd_values(model, traces, u, eps=1e-2)
    expected = (theta[None] - t) @ (g / g.norm())  # exact: central differences are exact on quadratics
    assert torch.allclose(a, expected, atol=1e-9)
    assert torch.equal(model.theta.detach(), theta)  # weights restored
    # the trace equal to the holdout target helps (a > 0); the one mirrored away from it hurts the most
    assert float(a[0]) > 0 and int(a.argmin()) == 1 and float(a[1]) < 0


def test_oracle_on_a_closed_form_case():
    model, h, t, holdout, _, step = quadratic_case()
    theta = model.theta.detach().clone()
    lr = 0.3
    got = oracle_values(model, step, holdout, range(len(t)), lr)
    for i in range(len(t)):
        after = theta - lr * (theta - t[i])
        exact = 0.5 * float((theta - h).pow(2).sum()) - 0.5 * float((after - h).pow(2).sum())
        assert float(got[i]) == pytest.approx(exact, rel=1e-12)
    assert torch.equal(model.theta.detach(), theta)
    # to first order the oracle is lr * ||g|| * a_i: same ranking as the cheap value
    u, norm = holdout_direction(model, holdout)
    a = fd_values(model, _traces_of(t), u)
    small = oracle_values(model, step, holdout, range(len(t)), 1e-4)
    assert torch.allclose(small, 1e-4 * norm * a, rtol=1e-3)
    assert spearman(a, small) == pytest.approx(1.0)


def _traces_of(t):
    return lambda m: 0.5 * (m.theta[None] - t).pow(2).sum(-1)


def test_weights_normalisation_clipping_and_sign():
    a = torch.tensor([-3.0, -1.0, 0.0, 0.5, 10.0])
    w = value_weights(a, beta=1.0)
    assert float(w.mean()) == pytest.approx(1.0)
    assert list(torch.argsort(w)) == [0, 1, 2, 3, 4]  # default sign: higher value, higher weight
    flipped = value_weights(a, beta=1.0, sign=-1)
    assert float(flipped.mean()) == pytest.approx(1.0)
    assert list(torch.argsort(flipped)) == [4, 3, 2, 1, 0]
    # clipping: standardised values beyond ±c give the same weight
    z = (a - a.mean()) / a.std()
    c = 0.5
    wc = value_weights(a, beta=2.0, clip=c)
    raw = torch.exp(2.0 * z.clamp(-c, c).double())
    assert torch.allclose(wc, raw / raw.mean())
    assert float(wc.max() / wc.min()) == pytest.approx(math.exp(2 * 2.0 * c))
    # beta 0 is the passive student; a constant value too
    assert torch.allclose(value_weights(a, beta=0.0), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(value_weights(torch.full((4,), 2.5), beta=3.0), torch.ones(4, dtype=torch.float64))
    # without standardising, the raw value is tilted (reference code: exp(beta * clip(a, -10, 10)))
    wr = value_weights(a, beta=0.5, clip=10.0, standardized=False)
    ref = torch.exp(0.5 * a.double().clamp(-10, 10))
    assert torch.allclose(wr, ref / ref.mean())
    s = weight_stats(a, w)
    assert 0 < s["ess_fraction"] <= 1 and 0.2 <= s["frac_mass_top20"] <= 1


def test_weights_bad_input():
    with pytest.raises(UserError, match="beta must be >= 0"):
        value_weights(torch.zeros(3), beta=-0.1)
    with pytest.raises(UserError, match="sign"):
        value_weights(torch.zeros(3), beta=1.0, sign=0)
    with pytest.raises(UserError, match="kept fraction"):
        top_fraction(torch.zeros(3), 0.0)


def test_top_fraction():
    a = torch.tensor([0.1, 0.9, -0.5, 0.4, 0.4])
    assert top_fraction(a, 0.4).tolist() == [1, 3]
    assert top_fraction(a, 0.4, sign=-1).tolist() == [0, 2]
    assert top_fraction(a, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert top_fraction(a, 0.01).tolist() == [1]


def test_ranks_and_spearman():
    assert ranks(torch.tensor([3.0, 1.0, 2.0, 1.0])).tolist() == [4.0, 1.5, 3.0, 1.5]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(5)))
    assert math.isnan(spearman(x[:1], x[:1]))
    # matches the textbook formula 1 - 6 Σd² / (n(n²-1)) without ties
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])
    d = ranks(x) - ranks(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * float(d.pow(2).sum()) / (5 * 24))


def test_on_a_language_model_clean_traces_outweigh_corrupted_ones(task_tok):
    torch.set_num_threads(1)
    from distillarena.models.presets import build_preset
    from distillarena.tasks.arithmetic import ArithmeticTask
    from distillarena.tasks.data import encode_example, problem_example

    model = build_preset("tiny", task_tok, seed=0)
    problems = ArithmeticTask().problems("holdout", 12, [1, 2], seed=0)
    holdout = [encode_example(task_tok, problem_example(p)) for p in problems]
    rng = random.Random(0)
    digits = [task_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    corrupted = []
    for ids, labels in holdout[:6]:
        p = sum(1 for x in labels if x == -100)
        junk = [rng.randrange(len(task_tok)) if rng.random() < 0.7 else rng.choice(digits)
                for _ in range(len(ids) - p)]
        corrupted.append((ids[:p] + junk, labels[:p] + junk))
    traces = holdout[:6] + corrupted
    pad = task_tok.pad_token_id
    val = value_traces(model, traces, holdout, pad_id=pad, eps=1e-2)
    w = value_weights(val.values, beta=1.0)
    assert float(w[:6].mean()) > float(w[6:].mean())
    assert float(value_weights(val.values, beta=1.0, sign=-1)[:6].mean()) < 1.0  # the reference code's sign
    # the cheap value ranks the traces as the oracle does
    oracle = oracle_traces(model, traces, holdout, range(len(traces)), pad_id=pad, lr=1e-2)
    assert float(oracle[:6].mean()) > float(oracle[6:].mean())
    assert spearman(val.values, oracle) > 0.5
