"""The demo's findings: each verdict follows from the numbers, on hand-made game rows and distillation runs."""

import math

import pytest

from distillarena.report.findings import adaptive_gap, compute_findings, defense_cost, hpd_entropy, matched_utility


def row(defense, params, attacker_kind, seed, recovery, **kw):
    label = f"{defense}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else defense
    # base student 0.4, undefended reference 0.5: R = (acc - 0.4) / 0.1
    acc = 0.4 + 0.1 * recovery if math.isfinite(recovery) else 0.4
    return {"defense": defense, "params": params, "defense_label": label, "attacker": attacker_kind,
            "attacker_kind": attacker_kind, "seed": seed, "recovery": recovery, "student_accuracy": acc,
            "base_accuracy": 0.4, **kw}


def test_adaptive_gap_is_paired_by_seed_and_skips_the_undefended_reference():
    rows = [row("none", {}, "passive", 0, 1.0), row("none", {}, "adaptive", 0, 1.0),
            row("poe", {"gamma": 0.7}, "passive", 0, 0.2), row("poe", {"gamma": 0.7}, "adaptive", 0, 0.5),
            row("poe", {"gamma": 0.7}, "passive", 1, 0.4), row("poe", {"gamma": 0.7}, "adaptive", 1, 0.5)]
    f = adaptive_gap(rows)
    assert f["verdict"] == "yes"
    assert f["gap_mean"] == pytest.approx(0.2)  # (0.3 + 0.1) / 2
    assert f["gap_std"] == pytest.approx(math.sqrt(0.02))
    rows.append(row("temperature", {"temperature": 2.0}, "passive", 0, 0.6))
    rows.append(row("temperature", {"temperature": 2.0}, "adaptive", 0, 0.1))
    assert adaptive_gap(rows)["verdict"] == "mixed"


def test_adaptive_gap_falls_back_to_accuracy_when_recovery_is_undefined():
    nan = float("nan")
    # the adaptive student loses accuracy on the undefended traces (0.35 < base 0.4): its R is undefined
    rows = [row("none", {}, "passive", 0, 1.0), row("none", {}, "adaptive", 0, nan, student_accuracy=0.35),
            row("poe", {"gamma": 0.7}, "passive", 0, 0.5), row("poe", {"gamma": 0.7}, "adaptive", 0, nan,
                                                                 student_accuracy=0.3)]
    f = adaptive_gap(rows)
    assert f["verdict"] == "no (by accuracy; R undefined)"
    assert "adaptive gains -0.050" in f["evidence"] and "student accuracy -0.15" in f["evidence"]


def summ(defense, params, attacker, teacher_accuracy, recovery, **kw):
    r = row(defense, params, attacker, 0, recovery, teacher_accuracy=teacher_accuracy, seeds=[0, 1, 2], **kw)
    del r["seed"]
    return r


def test_matched_utility_interpolates_the_temperature_curve():
    # temperature: (0.9, R=1 undefended), (0.5, R=0.6), (0.3, R=0.2); PoE at accuracy 0.4 -> temperature R 0.4
    rows = [summ("none", {}, "passive", 0.9, 1.0), summ("temperature", {"temperature": 1.5}, "passive", 0.5, 0.6),
            summ("temperature", {"temperature": 2.0}, "passive", 0.3, 0.2),
            summ("poe", {"gamma": 0.7}, "passive", 0.4, 0.1)]
    f = matched_utility(rows)
    assert f["verdict"] == "yes"
    assert f["mean_difference"] == pytest.approx(0.1 - 0.4)
    rows[-1]["recovery"] = 0.55
    assert matched_utility(rows)["verdict"] == "no"
    rows[-1]["teacher_accuracy"] = 0.95  # above the undefended teacher: no matched point
    f = matched_utility(rows)
    assert f["verdict"].startswith("undefined") and "outside" in f["evidence"]


def test_defense_cost_compares_every_poe_strength_with_every_antidistillation_one():
    cost = dict(proxy_forwards_per_token=1, offline_s=0.0)
    rows = [summ("poe", {"gamma": 0.7}, "passive", 0.5, 0.5, teacher_tokens_per_s=1000, teacher_step_validity=0.9,
                 **cost),
            summ("antidistillation", {"lam": 1.0}, "passive", 0.5, 0.5, teacher_tokens_per_s=400,
                 teacher_step_validity=0.7, proxy_forwards_per_token=2, offline_s=3.0)]
    assert defense_cost(rows)["verdict"] == "yes"
    rows[1]["teacher_step_validity"] = 0.95
    assert defense_cost(rows)["verdict"] == "no"
    assert defense_cost(rows[:1])["verdict"] == "not measured"


def run(objective, seed, accuracy, first_step_entropy, student_entropy):
    return {"objective": objective, "seed": seed, "first_step_entropy": first_step_entropy,
            "final": {"accuracy": accuracy, "student_entropy": student_entropy, "teacher_entropy": 0.3}}


def test_hpd_entropy_verdict_has_three_parts():
    runs = [run("hpd", 0, 0.6, 0.40, 0.28), run("hpd", 1, 0.5, 0.36, 0.30),
            run("sft", 0, 0.5, 0.10, 0.15), run("sft", 1, 0.5, 0.12, 0.14), run("seqkd", 0, 0.54, 0.3, 0.2)]
    f = hpd_entropy(runs, teacher_first_step=0.42, teacher_entropy=0.3)
    assert f["verdict"] == "yes", f["evidence"]
    runs.append(run("seqkd", 1, 0.9, 0.3, 0.2))  # the best baseline now beats HPD on average
    f = hpd_entropy(runs, teacher_first_step=0.42, teacher_entropy=0.3)
    assert f["verdict"] == "mixed"
    assert f["parts"]["HPD at least as accurate as the best baseline"] is False
    assert "best baseline seqkd" in f["evidence"]


def test_compute_findings_marks_skipped_parts_not_measured():
    fs = compute_findings(None, 0.4, 0.3, None, None)
    assert [f["number"] for f in fs] == [1, 2, 3, 4]
    assert all(f["verdict"] == "not measured" for f in fs)
    assert all(f["question"] for f in fs)
