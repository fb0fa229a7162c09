"""The demo's four findings, computed from its distillation runs and its game, whatever they show.

Each finding is decided by an interval, never by the sign of a mean: its headline effect comes with a paired 95%
bootstrap interval over the shared test problems and the seeds (:mod:`distillarena.report.stats`), and the verdict
is ``yes`` or ``no`` only when that interval lies wholly on one side of zero, ``inconclusive`` otherwise (and
``not measured`` when the run lacks what the question needs). A finding is a dict: ``number``, ``question``,
``verdict``, ``effect`` / ``ci_low`` / ``ci_high`` / ``n`` (the headline effect; ``effect_name`` says what it is),
``evidence`` (one line, the numbers behind it) and ``seeds``.

1. Do adaptive students learn more from defended traces than passive ones? Effect: adaptive minus passive student
   accuracy, paired by seed and problem, over every defended setting.
2. At matched teacher utility, does PoE hold students back more than a temperature increase? Effect: the student's
   accuracy under PoE minus its accuracy under temperature interpolated to PoE's teacher accuracy.
3. Does PoE cost less per token than antidistillation sampling and keep a higher step validity? Cost: proxy forwards
   per generated token (structural) and measured throughput; effect: PoE minus antidistillation step validity of the
   teacher's traces, paired by prompt and seed.
4. Does HPD end at least as accurate as the best baseline, with the student's entropy at the step-order choice nearer
   the teacher's than SFT's? Effect: HPD minus the best baseline's accuracy, paired by problem and seed; the entropy
   part has its own interval.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from distillarena.report.stats import (
    Interval,
    bootstrap_mean,
    finite,
    mean_std,
    outcomes,
    paired_difference,
    verdict,
)

QUESTIONS = {
    1: "Do adaptive students learn more from defended traces than passive ones?",
    2: "At matched teacher utility, does PoE hold students back more than a temperature increase?",
    3: "Does PoE cost less per token than antidistillation sampling and keep a higher step validity?",
    4: "Does HPD end at least as accurate as the best baseline, with its entropy at the step-order choice nearer the "
       "teacher's than SFT's?",
}


def format_mean_std(m: float, s: float, n: int = 2, digits: int = 2) -> str:
    """``mean ± std`` over seeds; the mean alone from one seed (a std of one value says nothing)."""
    if not finite(m):
        return "n/a"
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _defended(r: dict[str, Any]) -> bool:
    return not r.get("undefended_reference", r["defense"] == "none" and not r["params"])


def _result(effect: Interval | None, effect_name: str, answer: str, evidence: str, seeds: list[int],
            **extra: Any) -> dict[str, Any]:
    out = {"verdict": answer, "effect_name": effect_name, "evidence": evidence, "seeds": seeds,
           "effect": None, "ci_low": None, "ci_high": None, "n": 0, **extra}
    if effect is not None:
        out.update(effect=effect.mean, ci_low=effect.ci_low, ci_high=effect.ci_high, n=effect.n)
    return out


def _not_measured(why: str, seeds: list[int] | None = None) -> dict[str, Any]:
    return _result(None, "", "not measured", why, seeds or [])


def _stack(rows: list[dict[str, Any]], seeds: list[int], key: str = "student_correct") -> np.ndarray | None:
    by = {r["seed"]: r.get(key) for r in rows}
    arrs = [outcomes(by.get(s)) if isinstance(by.get(s), str) else
            (np.asarray(by[s], dtype=np.float64) if by.get(s) is not None else None) for s in seeds]
    if not arrs or any(a is None for a in arrs):
        return None
    return np.stack(arrs)


def adaptive_gap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 1: adaptive minus passive student accuracy on the defended settings, paired by seed and problem."""
    seeds_all = sorted({r["seed"] for r in rows})
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    kinds = {}
    for r in rows:
        if _defended(r):
            groups[r["defense_label"]][r["attacker"]].append(r)
            kinds[r["attacker"]] = r["attacker_kind"]
    diffs, parts = [], []
    for label, by_att in sorted(groups.items()):
        passive = next((a for a in by_att if kinds[a] == "passive"), None)
        for a, rs in sorted(by_att.items()):
            if passive is None or kinds[a] != "adaptive":
                continue
            seeds = sorted({r["seed"] for r in rs} & {r["seed"] for r in by_att[passive]})
            x, y = _stack(rs, seeds), _stack(by_att[passive], seeds)
            if x is None or y is None:
                continue
            diffs.append(x - y)
            parts.append(f"{label} / {a}: {paired_difference(x, y).format(3)}")
    if not diffs:
        return _not_measured("needs a passive and an adaptive attacker on a defended setting, with per-problem "
                             "outcomes", seeds_all)
    shapes = {d.shape for d in diffs}
    if len(shapes) != 1:
        return _not_measured("the settings were played with different seeds; compare them one by one: "
                             + "; ".join(parts), seeds_all)
    effect = bootstrap_mean(np.stack(diffs, axis=1))  # [seeds, settings, problems]
    return _result(effect, "adaptive minus passive student accuracy (all defended settings)", verdict(effect),
                   f"all settings {effect.format(3)}; per setting: " + "; ".join(parts), seeds_all)


def _bracket(points: list[tuple[float, Any]], x: float) -> tuple[Any, Any, float] | None:
    """The two points whose x brackets ``x`` and the weight of the second (linear interpolation); None outside."""
    pts = sorted(points, key=lambda p: p[0])
    for (x0, a), (x1, b) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return a, b, (0.0 if x1 == x0 else (x - x0) / (x1 - x0))
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1], pts[0][1], 0.0
    return None


def matched_utility(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 2: per attacker and PoE strength, the student's accuracy under PoE minus its accuracy under a
    temperature increase of the same teacher accuracy (linear interpolation between the two temperature settings,
    or the undefended teacher, that bracket it), paired by seed and problem. Negative: PoE holds students back
    more. (Teacher accuracy is itself measured on the traces; its noise is not in the interval.)"""
    seeds_all = sorted({r["seed"] for r in rows})
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["attacker"], r["defense_label"])].append(r)
    diffs, parts = [], []
    for att in sorted({r["attacker"] for r in rows}):
        cells = {label: rs for (a, label), rs in by.items() if a == att}
        temp = [rs for rs in cells.values() if rs[0]["defense"] == "temperature" or not _defended(rs[0])]
        poe = [rs for rs in cells.values() if rs[0]["defense"] == "poe"]
        for prs in poe:
            seeds = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in temp + [prs]])) if temp else []
            if not seeds:
                continue
            curve = [(mean_std([r["teacher_accuracy"] for r in rs])[0], rs) for rs in temp]
            x_poe = mean_std([r["teacher_accuracy"] for r in prs])[0]
            br = _bracket(curve, x_poe)
            if br is None:
                lo, hi = min(c[0] for c in curve), max(c[0] for c in curve)
                parts.append(f"{att}, {prs[0]['defense_label']}: teacher accuracy {x_poe:.3f} outside the "
                             f"temperature curve's [{lo:.3f}, {hi:.3f}]")
                continue
            a, b, w = br
            xa, xb, xp = _stack(a, seeds), _stack(b, seeds), _stack(prs, seeds)
            if xa is None or xb is None or xp is None:
                continue
            d = xp - ((1 - w) * xa + w * xb)
            diffs.append(d)
            parts.append(f"{att}, {prs[0]['defense_label']} at teacher accuracy {x_poe:.3f}: "
                         f"{bootstrap_mean(d).format(3)}")
    if not diffs:
        why = "; ".join(parts) if parts else "the game needs temperature and poe defenses with per-problem outcomes"
        return _not_measured(why, seeds_all)
    if len({d.shape for d in diffs}) != 1:
        return _not_measured("settings with different seeds: " + "; ".join(parts), seeds_all)
    effect = bootstrap_mean(np.stack(diffs, axis=1))
    return _result(effect, "student accuracy under PoE minus under temperature at the same teacher accuracy",
                   verdict(effect, yes_when="negative"), f"pooled {effect.format(3)}; " + "; ".join(parts), seeds_all)


def defense_cost(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 3: proxy forwards per token and measured throughput of each PoE against each antidistillation
    setting, and the difference of their traces' step validity, paired by prompt and seed."""
    seeds_all = sorted({r["seed"] for r in rows})
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["defense"] in ("poe", "antidistillation"):
            by[r["defense_label"]].append(r)
    poe = {k: v for k, v in by.items() if v[0]["defense"] == "poe"}
    ads = {k: v for k, v in by.items() if v[0]["defense"] == "antidistillation"}
    if not poe or not ads:
        return _not_measured("needs both a poe and an antidistillation defense in the game (examples/findings.yaml "
                             "has both)", seeds_all)

    def one_per_seed(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:  # traces are shared by the attackers
        return list({r["seed"]: r for r in rs}.values())

    diffs, parts, cheaper = [], [], []
    for pl, prs in sorted(poe.items()):
        for al, ars in sorted(ads.items()):
            prs1, ars1 = one_per_seed(prs), one_per_seed(ars)
            seeds = sorted({r["seed"] for r in prs1} & {r["seed"] for r in ars1})
            fp = mean_std([r["proxy_forwards_per_token"] for r in prs1])[0]
            fa = mean_std([r["proxy_forwards_per_token"] for r in ars1])[0]
            tp = mean_std([r.get("teacher_tokens_per_s") for r in prs1])[0]
            ta = mean_std([r.get("teacher_tokens_per_s") for r in ars1])[0]
            cheaper.append(fp < fa)
            text = f"{pl} vs {al}: proxy forwards/token {fp:.0f} vs {fa:.0f}, {tp:.0f} vs {ta:.0f} tokens/s"
            xp, xa = _stack(prs1, seeds, "trace_step_validity"), _stack(ars1, seeds, "trace_step_validity")
            if xp is not None and xa is not None and xp.shape == xa.shape:
                diffs.append(xp - xa)
                text += f", step validity difference {bootstrap_mean(xp - xa).format(3)}"
            parts.append(text)
    if not diffs:
        return _result(None, "", "inconclusive" if all(cheaper) else "no",
                       "no per-trace step validity to compare; " + "; ".join(parts), seeds_all)
    effect = bootstrap_mean(np.stack(diffs, axis=1))
    sv = verdict(effect)
    answer = "no" if (not all(cheaper) or sv == "no") else sv
    return _result(effect, "PoE minus antidistillation step validity of the teacher's traces", answer,
                   "; ".join(parts) + f"; pooled step validity difference {effect.format(3)} (throughput is one "
                   "measurement per cell, on a shared machine)", seeds_all)


def hpd_entropy(runs: list[dict[str, Any]], teacher_first: list[float] | None) -> dict[str, Any]:
    """Finding 4, from the demo's distillation runs (``objective``, ``seed``, ``final`` eval record with per-problem
    ``correct``, ``entropy`` with per-problem ``first_multi``): HPD minus the best baseline's accuracy; and how much
    nearer the teacher HPD's entropy at the step-order choice is than SFT's, per problem."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by[r["objective"]].append(r)
    seeds_all = sorted({r["seed"] for r in runs})
    featured, reference = "hpd", "sft"
    if featured not in by or reference not in by:
        return _not_measured("needs hpd and sft among the objectives", seeds_all)

    def final_outcomes(obj: str, seeds: list[int]) -> np.ndarray | None:
        return _stack([{"seed": r["seed"], "student_correct": r["final"].get("correct")} for r in by[obj]], seeds)

    seeds = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in by.values()]))
    acc = {o: mean_std([r["final"].get("accuracy") for r in rs]) for o, rs in by.items()}
    baselines = [o for o in by if o != featured and finite(acc[o][0])]
    if not baselines or final_outcomes(featured, seeds) is None:
        return _not_measured("needs per-problem outcomes of hpd and at least one baseline", seeds_all)
    best = max(baselines, key=lambda o: acc[o][0])
    acc_gap = paired_difference(final_outcomes(featured, seeds), final_outcomes(best, seeds))
    acc_verdict = verdict(acc_gap, margin=0.0)
    # "at least as accurate": no only when HPD is clearly below the best baseline
    acc_answer = "no" if acc_verdict == "no" else "yes" if acc_verdict == "yes" else "inconclusive"
    parts = {"accuracy": acc_answer}
    evidence = (f"accuracy: HPD {format_mean_std(*acc[featured])}, best baseline {best} "
                f"{format_mean_std(*acc[best])}, HPD minus {best} {acc_gap.format(3)}; "
                + ", ".join(f"{o} {format_mean_std(*acc[o])}" for o in sorted(by) if o != featured))
    ent = None
    if teacher_first:
        t = np.asarray(teacher_first, dtype=np.float64)
        h = {o: _stack([{"seed": r["seed"], "e": r.get("entropy", {}).get("first_multi")} for r in by[o]], seeds, "e")
             for o in (featured, reference)}
        if all(v is not None and v.shape[1] == t.size for v in h.values()):
            ent = bootstrap_mean(np.abs(h[featured] - t) - np.abs(h[reference] - t))
            parts["entropy"] = verdict(ent, yes_when="negative")
            evidence += (f". Entropy at the step-order choice (nats, {t.size} problems): teacher {t.mean():.3f}, "
                         f"HPD {h[featured].mean():.3f}, SFT {h[reference].mean():.3f}; |HPD - teacher| minus "
                         f"|SFT - teacher| {ent.format(3)}")
    answers = list(parts.values())
    answer = "no" if "no" in answers else "yes" if all(a == "yes" for a in answers) else "inconclusive"
    return _result(acc_gap, f"HPD minus the best baseline's ({best}) accuracy", answer, evidence, seeds_all,
                   parts=parts, entropy_effect=ent.as_dict() if ent is not None else None)


def compute_findings(distill_runs: list[dict[str, Any]] | None, teacher_first: list[float] | None,
                     game_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The four findings in order; a part of the demo that was skipped gives ``not measured``."""
    skipped = "the game was skipped (game: null)"
    out = [adaptive_gap(game_rows) if game_rows is not None else _not_measured(skipped),
           matched_utility(game_rows) if game_rows is not None else _not_measured(skipped),
           defense_cost(game_rows) if game_rows is not None else _not_measured(skipped),
           hpd_entropy(distill_runs, teacher_first) if distill_runs else
           _not_measured("distillation was skipped (distill: null)")]
    for i, f in enumerate(out, 1):
        f["question"] = QUESTIONS[i]
        f["number"] = i
    return out
