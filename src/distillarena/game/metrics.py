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

from distillarena.report.stats import (
    Interval,
    finite,
    mean_std,
    outcomes,
    paired_difference,
    paired_ratio,
    verdict,
)


def recovery(acc: float, base: float, ref: float) -> tuple[float, str | None]:
    """``(R, note)``; ``R`` is NaN with a note when the reference gains nothing over the base student."""
    gain = ref - base
    if not gain > 0:
        return float("nan"), (f"undefined: the same attacker on undefended traces gains nothing over the base "
                              f"student (acc {ref:.3f} vs base {base:.3f})")
    return (acc - base) / gain, None


AGGREGATED = ("recovery", "student_accuracy", "teacher_accuracy", "teacher_step_validity", "teacher_kl",
              "teacher_accuracy_forced", "teacher_tokens_per_s", "proxy_forwards_per_token", "offline_s",
              "oracle_spearman", "ess_fraction", "valuation_s", "train_s", "recovered_kl", "revealed_kl",
              "accepted_fraction", "majority_share", "n_trained", "spearman_value_gradnorm")


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


def by_cell_and_reference(rows: list[dict[str, Any]]
                          ) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """The rows grouped by (defense label, attacker) over seeds, and each attacker's undefended reference rows."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    refs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["defense_label"], r["attacker"])].append(r)
        if r.get("undefended_reference"):
            refs[r["attacker"]].append(r)
    return groups, refs


def intervals(rows: list[dict[str, Any]], base_correct: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (defense label, attacker): the accuracy gain over the base student, the same attacker's undefended
    gain (the shared denominator of R), and R as a ratio of means (``mean(student - base) / mean(reference -
    base)`` over the same seeds and problems), each with a paired 95% bootstrap interval. Missing outcomes (cells
    computed before they were stored) give no interval."""
    base = outcomes(base_correct)
    groups, refs = by_cell_and_reference(rows)
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


# --- the worst case over attackers -------------------------------------------------------------------------------
#
# A defense is as good as the best attacker it was tested against: per defended setting, the attacker with the
# highest recovery. Its R is the maximum of noisy estimates, so it is biased upwards (the winner's curse); the
# paired intervals below say whether the winner's lead over the passive student and over the runner-up is real.


def _recovery_replicates(x: np.ndarray, ref: np.ndarray, base: np.ndarray, seeds: np.ndarray,
                         probs: np.ndarray) -> np.ndarray:
    num = np.stack([(x[s][:, q] - base[q]).mean() for s, q in zip(seeds, probs, strict=True)])
    den = np.stack([(ref[s][:, q] - base[q]).mean() for s, q in zip(seeds, probs, strict=True)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def recovery_difference(xa: np.ndarray, refa: np.ndarray, xb: np.ndarray, refb: np.ndarray, base: np.ndarray, *,
                        replicates: int = 2000, seed: int = 0) -> Interval:
    """``R_a - R_b`` (each a ratio of mean gains over the base student, its own undefended reference as
    denominator) with a 95% paired bootstrap interval: seeds and test problems resampled together for both
    attackers (outcomes ``[seeds, problems]``, the same seeds and problems on every side)."""
    rng = np.random.default_rng(seed)
    s, p = xa.shape
    seeds = rng.integers(0, s, size=(replicates, s)) if s > 1 else np.zeros((replicates, 1), dtype=np.int64)
    probs = rng.integers(0, p, size=(replicates, p))
    ra = _recovery_replicates(xa, refa, base, seeds, probs)
    rb = _recovery_replicates(xb, refb, base, seeds, probs)
    d = ra - rb
    d = d[np.isfinite(d)]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = float((xa - base).mean() / (refa - base).mean() - (xb - base).mean() / (refb - base).mean())
    if not d.size:
        return Interval(mean, float("nan"), float("nan"), int(xa.size))
    lo, hi = np.quantile(d, [0.025, 0.975])
    return Interval(mean, float(lo), float(hi), int(xa.size))


def _compare(dlabel: str, win: dict[str, Any], other: dict[str, Any] | None, by_cell: dict, refs: dict,
             base: np.ndarray | None) -> dict[str, Any] | None:
    """The winner against ``other`` on one defended setting: paired differences of R and of student accuracy."""
    if other is None or base is None or other["attacker"] == win["attacker"]:
        return None
    seeds = sorted(set(win["seeds"]) & set(other["seeds"]))
    mats = []
    for att in (win["attacker"], other["attacker"]):
        x, ref = _matrix(by_cell[(dlabel, att)], seeds), _matrix(refs.get(att, []), seeds)
        if not seeds or x is None or ref is None or x.shape[1] != base.size:
            return None
        mats.append((x, ref))
    (xa, ra), (xb, rb) = mats
    d = recovery_difference(xa, ra, xb, rb, base)
    acc = paired_difference(xa, xb)
    return {"attacker": other["attacker"], "recovery_difference": d.as_dict(), "accuracy_difference": acc.as_dict(),
            "verdict": verdict(d) if finite(d.ci_low) else "inconclusive"}


def worst_case(rows: list[dict[str, Any]], summary: list[dict[str, Any]], base_correct: str | None
               ) -> list[dict[str, Any]]:
    """Per defended setting: every attacker's R, the winner (highest R among those with a reported R), the
    passive student's R, and the paired intervals of ``R(winner) - R(passive)``, ``R(winner) - R(runner-up)`` and
    of the student accuracy gap winner minus passive."""
    base = outcomes(base_correct)
    by_cell, refs = by_cell_and_reference(rows)
    settings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in summary:
        if s["defense"] == "none" and not s["params"]:
            continue  # the undefended reference: R = 1 by definition
        settings[s["defense_label"]].append(s)
    out = []
    for dlabel, atts in settings.items():
        ranked = sorted((s for s in atts if finite(s.get("recovery")) and not s.get("recovery_unstable")),
                        key=lambda s: -float(s["recovery"]))
        passive = next((s for s in atts if s["attacker_kind"] == "passive"), None)
        first = atts[0]
        entry: dict[str, Any] = {
            "defense_label": dlabel, "defense": first["defense"], "params": first["params"],
            "teacher_accuracy": (passive or first).get("teacher_accuracy"),
            "recoveries": {s["attacker"]: (s.get("recovery_ci") or {"mean": s.get("recovery")}) for s in atts},
            "skipped": sorted(s["attacker"] for s in atts if not finite(s.get("student_accuracy"))),
            "skip_reasons": {r["attacker"]: r["skipped"] for r in rows
                             if r["defense_label"] == dlabel and r.get("skipped")},
            "attacker": None}
        if passive is not None:
            entry["passive_recovery"] = passive.get("recovery_ci") or {"mean": passive.get("recovery")}
        if not ranked:
            out.append(entry)
            continue
        win = ranked[0]
        entry.update(attacker=win["attacker"], attacker_kind=win["attacker_kind"], recovery=win["recovery"],
                     recovery_ci=win.get("recovery_ci"), runner_up=ranked[1]["attacker"] if len(ranked) > 1 else None)

        entry["vs_passive"] = _compare(dlabel, win, passive, by_cell, refs, base)
        entry["vs_runner_up"] = _compare(dlabel, win, ranked[1] if len(ranked) > 1 else None, by_cell, refs, base)
        out.append(entry)
    return out
