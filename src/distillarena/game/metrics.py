"""The game's numbers: capability recovery, the passive/adaptive gap, and aggregation over seeds.

Recovery of an attacker on a defense::

    R = (acc_student - acc_base) / (acc_same_attacker_on_undefended_traces - acc_base)

``acc_base`` is the student before it sees any trace; the reference is the *same* attacker with the same seed
on traces of the undefended teacher (temperature 1, no processor). When the undefended attacker gains nothing
(``acc_ref <= acc_base``) R is undefined: NaN, with a note, never an error.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from distillarena.report.stats import mean_std


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
                        "recovery_gap": r["recovery"] - p["recovery"],
                        "accuracy_gap": r["student_accuracy"] - p["student_accuracy"]})
    return out
