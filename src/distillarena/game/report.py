"""The game's ``report.html`` (self-contained): the frontier, the cost bars, per-position entropies, example
traces side by side, and the tables."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from distillarena.game.collect import load_traces
from distillarena.game.config import GameConfig
from distillarena.game.detect import add_detectability_section
from distillarena.game.keys import UNDEFENDED, traces_key
from distillarena.game.utility import UTILITIES, format_interval
from distillarena.game.worst_case import add_worst_case_section
from distillarena.report.html import Report
from distillarena.report.stats import finite

COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def frontier_figure(summary: list[dict[str, Any]], attackers: list[str], utility: str = "teacher_accuracy",
                    utility_rows: list[dict[str, Any]] | None = None):
    """Teacher utility against student recovery, one curve per defense kind and attacker. ``utility`` is any of
    :data:`distillarena.game.utility.UTILITIES` (final-answer accuracy, step validity, checkable reasoning); with
    ``utility_rows`` (:func:`~distillarena.game.utility.utility_table`) it is read from there, with its 95% interval
    as the vertical bar."""
    util = {u["defense_label"]: u.get(utility) for u in (utility_rows or [])}
    if utility_rows is not None:
        summary = [{**r, utility: (util.get(r["defense_label"]) or {}).get("mean", float("nan")),
                    f"{utility}_bar": util.get(r["defense_label"])} for r in summary]
    summary = [r for r in summary if finite(r.get(utility))]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    kinds = sorted({r["defense"] for r in summary if r["defense"] != "none"} | (
        {"none"} if any(r["defense"] == "none" and r["params"] for r in summary) else set()))
    ref = [r for r in summary if r["defense"] == "none" and not r["params"]]
    for ki, kind in enumerate(kinds):
        color = COLORS[ki % len(COLORS)]
        for ai, att in enumerate(attackers):
            pts = [r for r in summary if r["defense"] == kind and r["attacker"] == att and finite(r["recovery"])]
            if not pts:  # (an attacker that did not play this defense: no curve of the reference point alone)
                continue
            pts += [r for r in ref if r["attacker"] == att and finite(r["recovery"])]
            pts.sort(key=lambda r: -r[utility])
            if not pts:
                continue
            passive = pts[0]["attacker_kind"] == "passive"
            ax.errorbar([r["recovery"] for r in pts], [r[utility] for r in pts],
                        xerr=np.array([_recovery_err(r) for r in pts]).T,
                        yerr=np.array([_utility_err(r, utility) for r in pts]).T,
                        color=color, marker=MARKERS[ai % len(MARKERS)], linestyle="--" if passive else "-",
                        capsize=3, label=f"{kind} / {att}")
    ax.axvline(1.0, color="#999", lw=0.8)
    ax.set(xlabel="student capability recovery R (1 = as much as from the undefended teacher)",
           ylabel=("teacher utility (accuracy of its answers to the queries)" if utility == "teacher_accuracy"
                   else f"teacher utility: {UTILITIES.get(utility, utility)}"),
           title="the distillation game's frontier (R with its 95% interval)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 6:  # many curves: the legend beside the axes, not over the points
        fig.set_size_inches(7.5 + 3.2, 5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
    elif handles:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite recovery yet: the undefended references gain nothing over the base student",
                ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True)
    return fig


def _utility_err(r: dict[str, Any], utility: str) -> tuple[float, float]:
    """Distances from the utility to its interval's ends (the seeds' std where no interval is given)."""
    bar = r.get(f"{utility}_bar") or {}
    if finite(bar.get("ci_low")) and finite(bar.get("ci_high")):
        return max(r[utility] - bar["ci_low"], 0.0), max(bar["ci_high"] - r[utility], 0.0)
    s = r.get(f"{utility}_std") if (r.get(f"{utility}_n") or 0) > 1 and finite(r.get(f"{utility}_std")) else 0.0
    return s, s


def utility_section(r: Report, summary_rows: list[dict[str, Any]], summary: dict[str, Any],
                    attackers: list[str]) -> None:
    """DistillGuard's two axes side by side: per defense setting, what a legitimate user keeps (final-answer
    accuracy, step validity, checkable reasoning, KL to the undefended teacher), each against the undefended
    teacher on the same prompts, next to what the distiller recovers; and the frontier drawn against each utility."""
    rows = summary.get("utility") or []
    if not rows:
        return
    r.heading("Utility a legitimate user feels, beside the distiller's recovery")
    r.text("Per defense setting, on the attacker's own queries: final-answer accuracy; step validity (share of the "
           "revealed reasoning lines that are valid steps; none shown: 0); checkable reasoning (at least one step, "
           "every step valid, the last step's result the stated answer); the KL to the undefended teacher per token "
           "where it is defined (not for output-level defenses, which rewrite the text). Each utility is its mean "
           "[95% bootstrap interval over seeds and prompts], then its paired difference to the undefended teacher on "
           "the same prompts and seeds; R and the gain are the first attacker's student's, as in the summary (every "
           "attacker's R: the table of who wins).", note=True)
    shown = attackers[:1]  # one attacker's columns: with several the table outgrows the page
    head = ["defense", "final-answer acc", "Δ acc", "step validity", "Δ validity", "checkable", "Δ checkable",
            "KL to undefended"]
    for a in shown:
        head += [f"R ({a})", f"gain ({a})"]
    body = []
    for u in rows:
        line = [u["defense_label"]]
        for k in UTILITIES:
            line += [format_interval(u.get(k)), format_interval(u.get(f"{k}_vs_undefended"), signed=True)]
        line.append(f"{u['teacher_kl']:.4f}" if finite(u.get("teacher_kl")) else "undefined")
        for a in shown:
            at = (u.get("attackers") or {}).get(a) or {}
            line += [_recovery_cell({"recovery_ci": at.get("recovery_ci"), "recovery": None}),
                     _interval(at.get("gain"))]
        body.append(line)
    r.table(head, body)
    marks = [u for u in rows if finite(u.get("poisoned_fraction")) or finite(u.get("changed_fraction"))]
    if marks:
        r.text("; ".join(f"{u['defense_label']}: " + ", ".join(
            f"{name} {u[k]:.3f}" for k, name in (("poisoned_fraction", "poisoned share"),
                                                 ("changed_fraction", "share of texts changed")) if finite(u.get(k)))
            for u in marks) + ".", note=True)
    for u in UTILITIES:
        r.figure(frontier_figure(summary_rows, attackers, u, rows),
                 f"The frontier against {UTILITIES[u]} (vertical bars: its 95% interval over seeds and prompts).")


def _recovery_err(r: dict[str, Any]) -> tuple[float, float]:
    """Distances from R to its bootstrap interval's ends (the seeds' std where no interval was stored)."""
    ci = r.get("recovery_ci") or {}
    if finite(ci.get("ci_low")) and finite(ci.get("ci_high")):
        return max(r["recovery"] - ci["ci_low"], 0.0), max(ci["ci_high"] - r["recovery"], 0.0)
    s = r.get("recovery_std") if finite(r.get("recovery_std")) else 0.0
    return s, s


def _interval(d: dict[str, Any] | None, digits: int = 3) -> str:
    if not d or not finite(d.get("mean")):
        return "–"
    return f"{d['mean']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"


def _recovery_cell(s: dict[str, Any]) -> str:
    ci = s.get("recovery_ci")
    if ci is None:
        return f"{s['recovery']:.2f}" if finite(s.get("recovery")) else "–"
    if ci.get("unstable"):
        return "unstable"
    return f"{ci['mean']:.2f} [{ci['ci_low']:.2f}, {ci['ci_high']:.2f}]"


def cost_figure(summary_rows: list[dict[str, Any]]):
    """Bars per defense setting: sampling throughput, proxy forwards per token and offline time; a panel whose
    values are all zero (no defense with a proxy, no offline work) is left out rather than drawn empty."""
    by: dict[str, dict[str, Any]] = {}
    for r in summary_rows:
        by.setdefault(r["defense_label"], r)
    labels = list(by)
    panels = [("teacher tokens/s (sampling, this machine)", [by[k].get("teacher_tokens_per_s") or 0 for k in labels]),
              ("proxy forwards per token", [by[k].get("proxy_forwards_per_token") or 0 for k in labels]),
              ("offline time (s): antidistillation holdout gradient", [by[k].get("offline_s") or 0 for k in labels])]
    panels = [p for p in panels if any(v > 0 for v in p[1])] or panels[:1]
    fig, ax = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for a, (title, v) in zip(ax[0], panels, strict=True):
        a.bar(range(len(labels)), v, color="#4477aa")
        a.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        a.set_title(title, fontsize=9)
        a.grid(alpha=0.3, axis="y")
    return fig


def entropy_figure(teacher: dict[str, Any], base: dict[str, Any], rows: list[dict[str, Any]], cfg: GameConfig):
    kinds = list(cfg.defenses)
    # problems with several valid solutions if there are any, else the single-solution ones
    key = "multi" if any(finite(x) for x in teacher["entropy"]["multi"]) else "single"
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.4), squeeze=False)
    for ax, d in zip(axes[0], kinds, strict=True):
        strongest = dict(d.strengths[-1])
        ax.plot(teacher["entropy"][key], color="k", lw=2, label="teacher (undefended model)")
        if base.get("entropy"):
            ax.plot(base["entropy"][key], color="#999", lw=1, label="student before traces")
        groups: dict[str, list[list[float]]] = defaultdict(list)
        kind_of = {}
        for r in rows:
            if r["defense"] == d.kind and r["params"] == strongest and r.get("student_entropy"):
                groups[r["attacker"]].append(r["student_entropy"][key])
                kind_of[r["attacker"]] = r["attacker_kind"]
        for i, (att, curves) in enumerate(groups.items()):
            n = len(curves[0])
            mean = [sum(c[j] for c in curves if finite(c[j])) / k if (k := sum(finite(c[j]) for c in curves))
                    else float("nan") for j in range(n)]  # positions no problem reaches stay blank
            ax.plot(mean, color=COLORS[i % len(COLORS)], linestyle="--" if kind_of[att] == "passive" else "-",
                    label=att)
        inner = ", ".join(f"{k}={v}" for k, v in sorted(strongest.items()))
        ax.set(title=f"{d.kind}({inner})", xlabel="completion position",
               ylabel=f"entropy (nats), {'several valid solutions' if key == 'multi' else 'one valid solution'}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def write_report(cfg: GameConfig, out: Path, rows: list[dict[str, Any]], summary_rows: list[dict[str, Any]],
                 summary: dict[str, Any]) -> Path:
    r = Report("distillarena game")
    add_game_sections(r, cfg, out, rows, summary_rows, summary)
    return r.write(Path(out) / "report.html")


def add_game_sections(r: Report, cfg: GameConfig, out: Path, rows: list[dict[str, Any]],
                      summary_rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The game's sections (frontier, tables, costs, entropies, example traces) appended to ``r``; the demo's
    report embeds them after its own."""
    import json


    out = Path(out)
    base = summary["base"]
    r.text(f"{len(rows)} cells: defenses x strengths x attackers x seeds {cfg.seeds}, budget {cfg.budget} teacher "
           f"queries per cell, student trained {cfg.train.steps} steps. Student accuracy before any trace: "
           f"{base['accuracy']:.3f} (test split, greedy, n={cfg.eval.n_problems}).")
    r.text("Recovery R = (acc_student - acc_base) / (acc_same_attacker_on_undefended_traces - acc_base). Adaptive "
           "weights: w = exp(beta * sign * clip(z)), z the standardised finite-difference value of each trace along "
           "the unit holdout gradient; sign +1 upweights traces whose training lowers the student's holdout loss "
           "(the reference code's weighting is sign -1).", note=True)
    if cfg.answer_forcing:
        r.text("Answer forcing is on: traces without an Answer line were completed by the UNDEFENDED teacher. This "
               "flatters the defense (forced accuracy is reported separately).", note=True)
    mm = summary.get("multimodality") or {}
    if mm.get("multimodal_share") is not None:
        entropy = (f"; the teacher's entropy where the first step is chosen: {mm['choice_entropy']:.3f} nats (mean "
                   f"over {mm['choice_entropy_n']} test problems with a choice)" if mm.get("choice_entropy") else "")
        decoding = ", ".join(f"{k} {v}" for k, v in cfg.decoding.params().items()) or "temperature 1"
        r.text(f"{mm['multimodal_share']:.0%} of the attacked prompts admit several valid solutions (step orders, "
               f"first-step operand orders){entropy}. The teacher samples at {decoding} under every defense.")
    attackers = [a.label for a in cfg.attackers]
    r.heading("Frontier: teacher utility against student recovery")
    unstable = sorted({f"{s['defense_label']} / {s['attacker']}" for s in summary_rows
                       if s.get("recovery_unstable")})
    r.figure(frontier_figure(summary_rows, attackers),
             "One colour per defense (its strengths along the curve, the undefended teacher at R = 1); passive "
             "students dashed, every other attacker solid (one marker per attacker). R is the ratio of the mean "
             "accuracy gains over the base student "
             "(defended over the same attacker's undefended gain, one shared denominator over the seeds); horizontal "
             "bars: its paired bootstrap 95% interval over test problems and seeds; vertical bars: std of the "
             "teacher's accuracy over seeds."
             + (f" Not drawn (R unstable: the undefended gain's interval reaches below 0.05): {', '.join(unstable)}."
                if unstable else ""))
    add_worst_case_section(r, summary_rows, summary.get("worst_case") or [], attackers, cfg)  # game/worst_case.py
    r.heading("Summary")
    r.text("Gains are student accuracy minus the base student's, paired by test problem (and seed), with 95% "
           "bootstrap intervals; the undefended gain is the denominator of R.", note=True)
    r.table(["defense", "attacker", "teacher acc", "teacher KL", "student acc", "gain [95% CI]",
             "undefended gain [95% CI]", "R [95% CI]", "value/oracle rho"],
            [[s["defense_label"], s["attacker"], s["teacher_accuracy"], s["teacher_kl"], s["student_accuracy"],
              _interval(s.get("gain")), _interval(s.get("undefended_gain")), _recovery_cell(s),
              s["oracle_spearman"]] for s in summary_rows])
    utility_section(r, summary_rows, summary, attackers)
    add_detectability_section(r, cfg, summary, summary_rows)
    if summary["gaps"]:
        r.heading("Each attacker against the passive student")
        r.table(["defense", "attacker", "accuracy gap (attacker - passive) [95% CI]", "R(attacker) - R(passive)"],
                [[g["defense_label"], g["attacker"], _interval(g.get("accuracy_gap_ci")) if g.get("accuracy_gap_ci")
                  else g["accuracy_gap"], g["recovery_gap"]] for g in summary["gaps"]])
    r.heading("Cost of each defense")
    r.figure(cost_figure(summary_rows), "Teacher sampling throughput on this machine, proxy forward passes per "
                                        "generated token, and offline time (the antidistillation holdout gradient); "
                                        "a cost no defense of this run has is not drawn.")
    teacher = json.loads((out / "teacher.json").read_text())
    if teacher.get("entropy"):
        r.heading("Per-position entropy: teacher and students")
        r.figure(entropy_figure(teacher, base, rows, cfg),
                 "Next-token entropy on 3-operation test problems (teacher-forced on reference solutions; those with "
                 "several valid solutions when the run has them); students trained on each defense's strongest "
                 "setting, passive dashed, mean over seeds.")
    r.heading("Example traces (first seed)")
    seed = cfg.seeds[0]
    columns = [("undefended", UNDEFENDED)]
    for d in cfg.defenses:
        columns.append((d.at(d.strengths[-1]).label, d.at(d.strengths[-1])))
    texts = []
    for _, dc in columns:
        folder = out / "traces" / traces_key(cfg, dc, seed)
        recs = load_traces(folder)[:4] if (folder / "traces.jsonl").is_file() else []
        texts.append(recs)
    n = max((len(t) for t in texts), default=0)
    r.table(["prompt"] + [c for c, _ in columns],
            [[next((t[i]["prompt"].strip() for t in texts if len(t) > i), "")]
             + [(t[i]["completion"].replace("\n", " / ") + (" ✓" if t[i]["correct"] else " ✗")) if len(t) > i
                else "" for t in texts] for i in range(n)])
