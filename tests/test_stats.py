"""Bootstrap intervals and verdicts on hand-made data with known answers."""

import numpy as np
import pytest

from distillarena.report.stats import bootstrap_mean, paired_difference, paired_ratio, verdict


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_interval_width_matches_the_normal_approximation():
    x = bernoulli(0.5, 1000, 0)
    iv = bootstrap_mean(x)
    se = np.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert iv.ci_low < x.mean() < iv.ci_high and iv.n == 1000
    assert iv.ci_high - iv.ci_low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_an_effect_far_from_zero_is_yes_or_no_and_one_straddling_zero_is_inconclusive():
    strong, weak = bernoulli(0.8, 1000, 1), bernoulli(0.3, 1000, 2)
    d = paired_difference(strong, weak)
    assert d.mean == pytest.approx(strong.mean() - weak.mean()) and d.ci_low > 0.4
    assert verdict(d) == "yes" and verdict(d, yes_when="negative") == "no"
    assert verdict(paired_difference(weak, strong)) == "no"
    same = paired_difference(bernoulli(0.5, 400, 3), bernoulli(0.5, 400, 4))
    assert same.ci_low < 0 < same.ci_high and verdict(same) == "inconclusive"
    # a margin: an effect of about 0.5 is not "above 0.6"
    assert verdict(d, margin=0.6) == "no"


def test_pairing_removes_the_shared_noise():
    # two arms that agree on almost every problem: the paired interval of their difference is narrow even though
    # each arm's own interval is wide
    a = bernoulli(0.5, 500, 5)
    b = a.copy()
    b[:10] = 1 - b[:10]
    d = paired_difference(a, b)
    assert d.ci_high - d.ci_low < 0.05 < bootstrap_mean(a).ci_high - bootstrap_mean(a).ci_low


def test_seeds_are_resampled_too():
    # three seeds that disagree: the interval over seeds and problems is wider than the one over problems alone
    rows = np.stack([bernoulli(p, 1000, 10 + i) for i, p in enumerate((0.3, 0.5, 0.7))])
    over_both = bootstrap_mean(rows)
    pooled = bootstrap_mean(rows.reshape(-1))
    assert over_both.n == pooled.n == 3000
    assert over_both.ci_high - over_both.ci_low > 3 * (pooled.ci_high - pooled.ci_low)


def test_a_ratio_over_a_zero_gain_denominator_is_unstable():
    base = bernoulli(0.5, 1000, 20)
    ref = base.copy()  # the undefended reference gains nothing
    student = bernoulli(0.6, 1000, 21)
    r = paired_ratio(student - base, ref - base)
    assert r.unstable and r.as_dict()["mean"] is None and "unstable" in r.format()


def test_a_ratio_with_a_clear_denominator_has_an_interval_around_it():
    base = np.zeros(1000)
    ref = bernoulli(0.6, 1000, 30)  # gain 0.6
    student = ref * bernoulli(0.5, 1000, 31)  # recovers about half of it, on the same problems
    r = paired_ratio(student - base, ref - base)
    assert not r.unstable and r.ci_low < 0.5 < r.ci_high and r.ci_high - r.ci_low < 0.15
    assert r.mean == pytest.approx(student.mean() / ref.mean())


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(np.ones(3), np.ones(4))
