"""The demo's findings: each verdict follows from its interval, on hand-made game rows and distillation runs with
known answers (a clear effect gives yes or no, an effect straddling zero gives inconclusive)."""

import zlib

import numpy as np
import pytest

from distillarena.report.findings import adaptive_gap, compute_findings, defense_cost, hpd_entropy, matched_utility

P = 600  # test problems


def outcomes(p: float, seed: int, n: int = P) -> str:
    x = np.random.default_rng(seed).random(n) < p
    return "".join("1" if v else "0" for v in x)


def row(defense, params, attacker_kind, seed, p, **kw):
    label = f"{defense}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else defense
    stream = zlib.crc32(f"{label}{attacker_kind}{seed}{p}".encode())
    return {"defense": defense, "params": params, "defense_label": label, "attacker": attacker_kind,
            "attacker_kind": attacker_kind, "seed": seed, "student_correct": outcomes(p, stream),
            "undefended_reference": defense == "none", **kw}


def test_adaptive_gap_yes_no_and_inconclusive():
    clear = [row("none", {}, "passive", s, 0.7) for s in (0, 1)] + \
            [row("poe", {"gamma": 0.7}, "passive", s, 0.4) for s in (0, 1)] + \
            [row("poe", {"gamma": 0.7}, "adaptive", s, 0.6) for s in (0, 1)]
    f = adaptive_gap(clear)
    assert f["verdict"] == "yes" and f["ci_low"] > 0.1 and f["n"] == 2 * P
    assert f["effect"] == pytest.approx(0.2, abs=0.05)
    worse = [r for r in clear if r["attacker"] != "adaptive"] + \
            [row("poe", {"gamma": 0.7}, "adaptive", s, 0.2) for s in (0, 1)]
    assert adaptive_gap(worse)["verdict"] == "no"
    tie = [r for r in clear if r["attacker"] != "adaptive"] + \
          [row("poe", {"gamma": 0.7}, "adaptive", s, 0.4) for s in (0, 1)]
    f = adaptive_gap(tie)
    assert f["verdict"] == "inconclusive" and f["ci_low"] < 0 < f["ci_high"]


def test_adaptive_gap_without_outcomes_is_not_measured():
    rows = [row("poe", {"gamma": 0.7}, k, 0, 0.5) for k in ("passive", "adaptive")]
    for r in rows:
        del r["student_correct"]
    assert adaptive_gap(rows)["verdict"] == "not measured"


def test_matched_utility_interpolates_the_temperature_curve_on_outcomes():
    # temperature curve: undefended (teacher 0.9, student 0.7), t1.5 (0.5, 0.5), t2.0 (0.3, 0.3)
    base = [row("none", {}, "passive", 0, 0.7, teacher_accuracy=0.9),
            row("temperature", {"temperature": 1.5}, "passive", 0, 0.5, teacher_accuracy=0.5),
            row("temperature", {"temperature": 2.0}, "passive", 0, 0.3, teacher_accuracy=0.3)]
    # PoE at teacher accuracy 0.4: the temperature curve gives about 0.4 there
    f = matched_utility(base + [row("poe", {"gamma": 0.7}, "passive", 0, 0.1, teacher_accuracy=0.4)])
    assert f["verdict"] == "yes" and f["effect"] == pytest.approx(-0.3, abs=0.06)
    f = matched_utility(base + [row("poe", {"gamma": 0.7}, "passive", 0, 0.8, teacher_accuracy=0.4)])
    assert f["verdict"] == "no"
    f = matched_utility(base + [row("poe", {"gamma": 0.7}, "passive", 0, 0.4, teacher_accuracy=0.95)])
    assert f["verdict"] == "not measured" and "outside" in f["evidence"]


def test_defense_cost_needs_cheaper_and_higher_step_validity():
    def trace_sv(mean, seed):
        return list(np.clip(np.random.default_rng(seed).normal(mean, 0.1, 512), 0, 1))

    poe = row("poe", {"gamma": 0.7}, "passive", 0, 0.5, proxy_forwards_per_token=1, teacher_tokens_per_s=1000,
              trace_step_validity=trace_sv(0.9, 1))
    ads = row("antidistillation", {"lam": 1.0}, "passive", 0, 0.5, proxy_forwards_per_token=2,
              teacher_tokens_per_s=400, trace_step_validity=trace_sv(0.7, 2))
    f = defense_cost([poe, ads])
    assert f["verdict"] == "yes" and f["effect"] == pytest.approx(0.2, abs=0.03)
    ads["trace_step_validity"] = trace_sv(0.95, 3)
    assert defense_cost([poe, ads])["verdict"] == "no"
    ads["trace_step_validity"] = trace_sv(0.9, 4)
    assert defense_cost([poe, ads])["verdict"] == "inconclusive"
    assert defense_cost([poe])["verdict"] == "not measured"


def run(objective, seed, p, first_entropy):
    return {"objective": objective, "seed": seed, "final": {"accuracy": p, "correct": outcomes(p, seed * 31 + len(
        objective))}, "entropy": {"first_multi": list(first_entropy)}}


def test_hpd_entropy_combines_accuracy_and_entropy_parts():
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.3, 0.5, 64)
    near, far = teacher + rng.normal(0, 0.02, 64), teacher * 0.2
    runs = [run("hpd", 0, 0.8, near), run("sft", 0, 0.5, far), run("seqkd", 0, 0.5, far)]
    f = hpd_entropy(runs, list(teacher))
    assert f["verdict"] == "yes" and f["parts"] == {"accuracy": "yes", "entropy": "yes"}, f["evidence"]
    runs = [run("hpd", 0, 0.3, near), run("sft", 0, 0.5, far), run("seqkd", 0, 0.5, far)]
    f = hpd_entropy(runs, list(teacher))
    assert f["verdict"] == "no" and f["parts"]["accuracy"] == "no"
    runs = [run("hpd", 0, 0.5, near), run("sft", 0, 0.5, far)]
    assert hpd_entropy(runs, list(teacher))["parts"]["accuracy"] == "inconclusive"


def test_compute_findings_marks_skipped_parts_not_measured():
    fs = compute_findings(None, None, None)
    assert [f["number"] for f in fs] == [1, 2, 3, 4]
    assert all(f["verdict"] == "not measured" and f["effect"] is None for f in fs)
    assert all(f["question"] for f in fs)
