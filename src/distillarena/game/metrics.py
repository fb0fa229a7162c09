"""The game's numbers: capability recovery, the passive/adaptive gap, and aggregation over seeds, with paired
bootstrap intervals over the shared test problems and the seeds (:mod:`distillarena.report.stats`).

Recovery of an attacker on a defense::

    R = (acc_student - acc_base) / (acc_same_attacker_on_undefended_traces - acc_base)

``acc_base`` is the student before it sees any trace; the reference is the *same* attacker with the same seed
on traces of the undefended teacher (temperature 1, no processor). When the undefended attacker gains nothing
(``acc_ref <= acc_base``) R is undefined: NaN, with a note, never an error.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from distillarena.report.stats import Interval, finite, mean_std, outcomes, paired_difference, paired_ratio


def recovery(acc: float, base: float, ref: float) -> tuple[float, str | None]:
    """``(R, note)``; ``R`` is NaN with a note when the reference gains nothing over the base student."""
    gain = ref - base
    if not gain > 0:
        return float("nan"), (f"undefined: the same attacker on undefended traces gains nothing over the base "
                              f"student (acc {ref:.3f} vs base {base:.3f})")
    return (acc - base) / gain, None


AGGREGATED = ("recovery", "student_accuracy", "teacher_accuracy", "teacher_step_validity", "teacher_kl",
              "teacher_accuracy_forced", "teacher_tokens_per_s", "proxy_forwards_per_token", "offline_s",
              "oracle_spearman", "ess_fraction", "valuation_s", "train_s")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (defense, strength, attacker): mean and std over seeds of every number in ``AGGREGATED``."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["defense_label"], r["attacker"])].append(r)
    out = []
    for (dlabel, attacker), rs in groups.items():
        first = rs[0]
        agg: dict[str, Any] = {"defense_label": dlabel, "defense": first["defense"], "params": first["params"],
                               "attacker": attacker, "attacker_kind": first["attacker_kind"],
                               "seeds": sorted(r["seed"] for r in rs)}
        for k in AGGREGATED:
            m, s, n = mean_std([r.get(k) for r in rs])
            agg[k], agg[f"{k}_std"], agg[f"{k}_n"] = m, s, n
        out.append(agg)
    return out


def _num(x: Any) -> float:
    return float(x) if finite(x) else float("nan")


def gaps(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The passive/adaptive gap per (defense, strength): R(attacker) - R(passive) for every non-passive attacker
    (means over seeds; positive: the attacker recovers more than the passive student)."""
    by: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in summary:
        by[r["defense_label"]][r["attacker"]] = r
    out = []
    for dlabel, atts in by.items():
        passive = [r for r in atts.values() if r["attacker_kind"] == "passive"]
        if not passive:
            continue
        p = passive[0]
        for name, r in atts.items():
            if r["attacker_kind"] == "passive":
                continue
            out.append({"defense_label": dlabel, "attacker": name, "passive": p["attacker"],
                        "recovery_gap": _num(r["recovery"]) - _num(p["recovery"]),
                        "accuracy_gap": r["student_accuracy"] - p["student_accuracy"]})
    return out


# --- intervals --------------------------------------------------------------------------------------------------
#
# Every cell stores its student's outcome on each test problem (``student_correct``: a string of 0/1, the problems in
# one fixed order shared by every cell and by the base student). Effects are then paired: by problem, and by seed
# between a defended cell and the same attacker's undefended reference.

RECOVERY_FLOOR = 0.05  # R is reported only when the undefended gain's interval stays above this


def _matrix(rows: list[dict[str, Any]], seeds: list[int]) -> np.ndarray | None:
    by_seed = {r["seed"]: outcomes(r.get("student_correct")) for r in rows}
    if any(by_seed.get(s) is None for s in seeds):
        return None
    return np.stack([by_seed[s] for s in seeds])


def intervals(rows: list[dict[str, Any]], base_correct: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (defense label, attacker): the accuracy gain over the base student, the same attacker's undefended
    gain (the shared denominator of R), and R as a ratio of means (``mean(student - base) / mean(reference -
    base)`` over the same seeds and problems), each with a paired 95% bootstrap interval. Missing outcomes (cells
    computed before they were stored) give no interval."""
    base = outcomes(base_correct)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    refs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["defense_label"], r["attacker"])].append(r)
        if r.get("undefended_reference"):
            refs[r["attacker"]].append(r)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (dlabel, attacker), rs in groups.items():
        seeds = sorted(r["seed"] for r in rs)
        x = _matrix(rs, seeds)
        ref = _matrix(refs.get(attacker, []), seeds)
        if base is None or x is None or x.shape[1] != base.size:
            continue
        b = np.broadcast_to(base, x.shape)
        entry: dict[str, Any] = {"gain": paired_difference(x, b)}
        if ref is not None:
            entry["undefended_gain"] = paired_difference(ref, b)
            entry["recovery"] = paired_ratio(x - b, ref - b, floor=RECOVERY_FLOOR)
        out[(dlabel, attacker)] = entry
    return out


def gap_intervals(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Interval]:
    """Per (defense label, non-passive attacker): its student accuracy minus the passive student's, paired by seed
    and problem, with a 95% interval."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    kinds = {}
    for r in rows:
        groups[r["defense_label"]][r["attacker"]].append(r)
        kinds[r["attacker"]] = r["attacker_kind"]
    out = {}
    for dlabel, by_att in groups.items():
        passive = [a for a in by_att if kinds[a] == "passive"]
        if not passive:
            continue
        for a, rs in by_att.items():
            if kinds[a] == "passive":
                continue
            seeds = sorted({r["seed"] for r in rs} & {r["seed"] for r in by_att[passive[0]]})
            x, y = _matrix(rs, seeds), _matrix(by_att[passive[0]], seeds)
            if seeds and x is not None and y is not None:
                out[(dlabel, a)] = paired_difference(x, y)
    return out
