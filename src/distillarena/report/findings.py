"""The demo's four findings, computed from its distillation runs and its game, whatever they show.

1. Do adaptive students recover at least as much as passive ones on defended traces, and by how much?
2. At matched teacher utility, does PoE hold students back more than a temperature increase?
3. Does PoE cost less per token than antidistillation sampling, and keep a higher step validity?
4. Does HPD's student keep an entropy near the teacher's while SFT on the same data collapses, and does HPD end at
   least as accurate as the best baseline?

Each finding is a dict: ``question``, ``verdict`` (``yes``, ``no``, ``mixed``, or ``not measured`` / ``undefined``
with the reason), ``evidence`` (one line of numbers) and ``seeds``. Means are over seeds; ``±`` is the sample
standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from distillarena.report.stats import finite, mean_std

QUESTIONS = {
    1: "Adaptive students recover at least as much as passive ones on defended traces; how large is the gap?",
    2: "At matched teacher utility, does PoE hold students back more than a temperature increase?",
    3: "PoE costs less per token than antidistillation sampling and keeps higher step validity.",
    4: "HPD's student keeps an entropy near the teacher's while SFT on the same data collapses, and HPD ends at "
       "least as accurate as the best baseline.",
}
COLLAPSE_RATIO = 0.5  # a student "collapses" at the step-order choice below half the teacher's entropy there


def format_mean_std(m: float, s: float, n: int = 2, digits: int = 2) -> str:
    """``mean ± std``; the mean alone from one seed (a std of one value says nothing)."""
    if not finite(m):
        return "n/a"
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


_pm = format_mean_std


def _verdict(flags: list[bool]) -> str:
    if not flags:
        return "undefined"
    return "yes" if all(flags) else "no" if not any(flags) else "mixed"


def _defended(r: dict[str, Any]) -> bool:
    return not (r["defense"] == "none" and not r["params"])


def adaptive_gap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 1: R(adaptive) - R(passive), paired by seed, per defended setting; and the student accuracy gap,
    which is defined even when R is not (R is undefined when an attacker gains nothing from undefended traces)."""
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if _defended(r):
            by[(r["defense_label"], r["seed"])][r["attacker"]] = r
        else:
            refs[(r["attacker"], r["seed"])] = r
    r_gaps: dict[str, list[float]] = defaultdict(list)
    acc_gaps: dict[str, list[float]] = defaultdict(list)
    for (label, _), atts in by.items():
        passive = next((x for x in atts.values() if x["attacker_kind"] == "passive"), None)
        adaptive = [x for x in atts.values() if x["attacker_kind"] == "adaptive"]
        for a in adaptive if passive is not None else []:
            name = label if len(adaptive) == 1 else f"{label} / {a['attacker']}"
            acc_gaps[name].append(a["student_accuracy"] - passive["student_accuracy"])
            if finite(a["recovery"]) and finite(passive["recovery"]):
                r_gaps[name].append(a["recovery"] - passive["recovery"])
    seeds = sorted({r["seed"] for r in rows})
    if not acc_gaps:
        return {"verdict": "not measured", "seeds": seeds,
                "evidence": "needs a passive and an adaptive attacker on a defended setting"}
    parts, flags = [], []
    for name in sorted(acc_gaps):
        am, as_, an = mean_std(acc_gaps[name])
        text = f"{name}: student accuracy {_pm(am, as_, an)}"
        if r_gaps.get(name):
            m, s, n = mean_std(r_gaps[name])
            flags.append(m >= 0)
            text += f", R {_pm(m, s, n)} (n={n})"
        else:
            text += ", R undefined"
        parts.append(text)
    out: dict[str, Any] = {"seeds": seeds}
    if flags:
        allm, alls, alln = mean_std([g for gs in r_gaps.values() for g in gs])
        out.update(verdict=_verdict(flags), gap_mean=allm, gap_std=alls)
        lead = f"R(adaptive) - R(passive), paired by seed, all settings {_pm(allm, alls, alln)} (n={alln}); "
    else:
        # no recovery to compare: say why, and judge by the accuracy the students reach on the same traces
        acc_flags = [mean_std(g)[0] >= 0 for g in acc_gaps.values()]
        out["verdict"] = f"{_verdict(acc_flags)} (by accuracy; R undefined)"
        undefined = sorted({f"{a} gains {r['student_accuracy'] - r['base_accuracy']:+.3f}"
                            for (a, _), r in refs.items() if "base_accuracy" in r})
        lead = ("R is undefined where an attacker's student gains nothing from the undefended teacher's traces "
                f"(accuracy over the base student: {', '.join(undefined)}); ")
    out["evidence"] = lead + "adaptive minus passive: " + "; ".join(parts)
    return out


def _interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x along ``curve`` ((x, y) points, any order); None outside its x range."""
    pts = sorted(curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == x else None


def matched_utility(summary_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 2: at each PoE strength's teacher accuracy, PoE's recovery against the temperature curve's
    (interpolated linearly in teacher accuracy, the undefended teacher at R = 1 included), per attacker."""
    ref = {r["attacker"]: r for r in summary_rows if r["defense"] == "none" and not r["params"]}
    parts, flags, diffs = [], [], []
    for att, undef in sorted(ref.items()):
        temp = [(r["teacher_accuracy"], r["recovery"]) for r in summary_rows
                if r["defense"] == "temperature" and r["attacker"] == att and finite(r["recovery"])]
        poe = [r for r in summary_rows if r["defense"] == "poe" and r["attacker"] == att and finite(r["recovery"])]
        if not temp or not poe:
            continue
        curve = temp + [(undef["teacher_accuracy"], 1.0)]
        for r in poe:
            rt = _interpolate(curve, r["teacher_accuracy"])
            if rt is None:
                lo, hi = min(x for x, _ in curve), max(x for x, _ in curve)
                parts.append(f"{att}, {r['defense_label']}: teacher accuracy {r['teacher_accuracy']:.2f} outside the "
                             f"temperature curve's [{lo:.2f}, {hi:.2f}]")
                continue
            d = r["recovery"] - rt
            diffs.append(d)
            flags.append(d < 0)
            parts.append(f"{att}, {r['defense_label']} at teacher accuracy {r['teacher_accuracy']:.2f}: "
                         f"R {r['recovery']:.2f} vs temperature {rt:.2f} ({d:+.2f})")
    seeds = sorted({s for r in summary_rows for s in r.get("seeds", [])})
    if not parts:
        return {"verdict": "not measured", "seeds": seeds,
                "evidence": "the game needs temperature and poe defenses with finite recoveries"}
    verdict = (_verdict(flags) if flags
               else "undefined (no PoE point at a teacher accuracy the temperature curve covers)")
    return {"verdict": verdict, "seeds": seeds, "evidence": "; ".join(parts),
            "mean_difference": sum(diffs) / len(diffs) if diffs else float("nan")}


def defense_cost(summary_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Finding 3: teacher tokens/s and step validity of every PoE strength against every antidistillation one
    (each strength's numbers are means over its cells)."""
    def per_setting(kind: str) -> dict[str, dict[str, float]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in summary_rows:
            if r["defense"] == kind:
                out[r["defense_label"]].append(r)
        return {k: {m: mean_std([x[m] for x in rs])[0] for m in
                    ("teacher_tokens_per_s", "teacher_step_validity", "proxy_forwards_per_token", "offline_s")}
                for k, rs in out.items()}

    poe, ads = per_setting("poe"), per_setting("antidistillation")
    seeds = sorted({s for r in summary_rows for s in r.get("seeds", [])})
    if not poe or not ads:
        return {"verdict": "not measured", "seeds": seeds,
                "evidence": "needs both a poe and an antidistillation defense in the game (examples/findings.yaml "
                            "has both)"}
    flags, parts = [], []
    for pl, p in poe.items():
        for al, a in ads.items():
            faster = p["teacher_tokens_per_s"] > a["teacher_tokens_per_s"]
            valid = p["teacher_step_validity"] > a["teacher_step_validity"]
            flags.append(faster and valid)
            parts.append(f"{pl} vs {al}: {p['teacher_tokens_per_s']:.0f} vs {a['teacher_tokens_per_s']:.0f} "
                         f"tokens/s, step validity {p['teacher_step_validity']:.2f} vs "
                         f"{a['teacher_step_validity']:.2f}")
    p0, a0 = next(iter(poe.values())), next(iter(ads.values()))
    parts.append(f"proxy forwards per token {p0['proxy_forwards_per_token']:.0f} vs "
                 f"{a0['proxy_forwards_per_token']:.0f}; offline {p0['offline_s']:.0f} s vs {a0['offline_s']:.0f} s")
    return {"verdict": _verdict(flags), "seeds": seeds, "evidence": "; ".join(parts)}


def hpd_entropy(runs: list[dict[str, Any]], teacher_first_step: float, teacher_entropy: float) -> dict[str, Any]:
    """Finding 4, from the demo's distillation runs (``objective``, ``seed``, ``final`` eval record,
    ``first_step_entropy``): entropies against the teacher's, and final accuracy against the best baseline."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by[r["objective"]].append(r)
    seeds = sorted({r["seed"] for r in runs})
    if "hpd" not in by or "sft" not in by:
        return {"verdict": "not measured", "seeds": seeds, "evidence": "needs hpd and sft among the objectives"}

    def stat(obj: str, key: str) -> tuple[float, float, int]:
        return mean_std([r["final"].get(key) if key != "first_step_entropy" else r.get(key) for r in by[obj]])

    h_hpd, h_sft = stat("hpd", "first_step_entropy"), stat("sft", "first_step_entropy")
    m_hpd, m_sft = stat("hpd", "student_entropy"), stat("sft", "student_entropy")
    acc = {obj: stat(obj, "accuracy") for obj in by}
    baselines = {o: a for o, a in acc.items() if o != "hpd" and finite(a[0])}
    best = max(baselines, key=lambda o: baselines[o][0]) if baselines else None
    near = abs(h_hpd[0] - teacher_first_step) < abs(h_sft[0] - teacher_first_step)
    collapsed = h_sft[0] < COLLAPSE_RATIO * teacher_first_step
    accurate = best is None or acc["hpd"][0] >= baselines[best][0]
    evidence = (f"entropy at the step-order choice (first completion token, problems with several orders): teacher "
                f"{teacher_first_step:.3f}, HPD {_pm(*h_hpd, digits=3)}, SFT {_pm(*h_sft, digits=3)} nats; "
                f"mean held-out entropy: teacher {teacher_entropy:.3f}, HPD {_pm(*m_hpd, digits=3)}, "
                f"SFT {_pm(*m_sft, digits=3)}; "
                f"accuracy: HPD {_pm(*acc['hpd'])}"
                + (f", best baseline {best} {_pm(*baselines[best])}" if best else "")
                + "; " + ", ".join(f"{o} {_pm(*a)}" for o, a in sorted(acc.items()) if o != "hpd"))
    parts = {"HPD entropy nearer the teacher's than SFT's": near,
             f"SFT collapses (below {COLLAPSE_RATIO:.0%} of the teacher's entropy at the choice)": collapsed,
             "HPD at least as accurate as the best baseline": accurate}
    return {"verdict": _verdict(list(parts.values())), "seeds": seeds, "parts": parts,
            "evidence": evidence + ". " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in parts.items())}


def compute_findings(distill_runs: list[dict[str, Any]] | None, teacher_first_step: float, teacher_entropy: float,
                     game_rows: list[dict[str, Any]] | None,
                     game_summary_rows: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The four findings in order; a part of the demo that was skipped gives ``not measured``."""
    skipped = {"verdict": "not measured", "seeds": [], "evidence": "the game was skipped (game: null)"}
    out = [adaptive_gap(game_rows) if game_rows is not None else dict(skipped),
           matched_utility(game_summary_rows) if game_summary_rows is not None else dict(skipped),
           defense_cost(game_summary_rows) if game_summary_rows is not None else dict(skipped),
           hpd_entropy(distill_runs, teacher_first_step, teacher_entropy) if distill_runs else
           {"verdict": "not measured", "seeds": [], "evidence": "distillation was skipped (distill: null)"}]
    for i, f in enumerate(out, 1):
        f["question"] = QUESTIONS[i]
        f["number"] = i
    return out
