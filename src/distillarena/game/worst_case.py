"""The defender's honest frontier in the game's report: per defense and strength the worst case over attackers (the
highest recovery), drawn beside every attacker's curve, and the table of who wins with paired intervals (the numbers
come from :func:`distillarena.game.metrics.worst_case`)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from distillarena.report.html import Report
from distillarena.report.stats import finite

PALETTE = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#994455", "#997700"]


def _ci(d: dict[str, Any] | None, digits: int = 2, signed: bool = False) -> str:
    if not d or not finite(d.get("mean")):
        return "unstable" if d and d.get("unstable") else "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if finite(d.get("ci_low")) and finite(d.get("ci_high")):
        return f"{f.format(d['mean'])} [{f.format(d['ci_low'])}, {f.format(d['ci_high'])}]"
    return f.format(d["mean"])


def worst_case_figure(summary_rows: list[dict[str, Any]], worst: list[dict[str, Any]], attackers: list[str]):
    """One panel per defense kind: each attacker's recovery along the strengths (thin; passive dashed) and the worst
    case over them (thick black), teacher utility on the vertical axis, the undefended teacher at R = 1."""
    kinds = sorted({w["defense"] for w in worst})
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(5.2 * max(len(kinds), 1), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=False):
        for ai, att in enumerate(attackers):
            pts = sorted((r for r in summary_rows if r["defense"] in (kind, "none") and r["attacker"] == att
                          and (r["defense"] == kind or not r.get("params"))  # the curve starts undefended, R = 1
                          and finite(r.get("recovery")) and not r.get("recovery_unstable")
                          and finite(r.get("teacher_accuracy"))), key=lambda r: -r["teacher_accuracy"])
            if not pts:
                continue
            passive = pts[0]["attacker_kind"] == "passive"
            ax.plot([r["recovery"] for r in pts], [r["teacher_accuracy"] for r in pts], lw=1.0, marker=".",
                    color=PALETTE[ai % len(PALETTE)], linestyle="--" if passive else "-", alpha=0.8, label=att)
        ws = sorted((w for w in worst if w["defense"] == kind and finite(w.get("recovery"))
                     and finite(w.get("teacher_accuracy"))), key=lambda w: -w["teacher_accuracy"])
        start = [r["teacher_accuracy"] for r in summary_rows if r["defense"] == "none" and not r.get("params")
                 and finite(r.get("teacher_accuracy"))][:1]
        if ws:
            ax.plot([1.0] * len(start) + [w["recovery"] for w in ws], start + [w["teacher_accuracy"] for w in ws],
                    color="k", lw=2.6, marker="*", ms=12, label="worst case (best attacker)", zorder=5)
            for w in ws:
                ax.annotate(w["attacker"], (w["recovery"], w["teacher_accuracy"]), fontsize=6,
                            xytext=(4, 4), textcoords="offset points")
        ax.axvline(1.0, color="#999", lw=0.8)
        ax.margins(x=0.08, y=0.08)
        ax.set(title=kind, xlabel="recovery R", ylabel="teacher accuracy on the queries")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no finite recovery", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    return fig


def threat_models(attackers: list[Any], budget: int) -> list[list[object]]:
    """One row per attacker (``AttackerConfig``): what it knows beyond the traces it bought, whether it needs
    revealed log-probs, and what it spends of the budget."""
    out = []
    for a in attackers:
        spec = a.spec
        spend = spec.spend(a.p, budget)
        out.append([a.label, spec.summary, ", ".join(spec.knows) or "the traces only",
                    "yes" if spec.needs_logprobs or a.learns_from_teacher else "no",
                    f"{spend.queries} ({spend.prompts} prompts x {spend.samples_per_prompt})", a.training_objective])
    return out


def add_worst_case_section(r: Report, summary_rows: list[dict[str, Any]], worst: list[dict[str, Any]],
                           attackers: list[str], cfg: Any | None = None) -> None:
    if not worst:
        return
    r.heading("Worst case over attackers: the defender's honest frontier")
    if cfg is not None:
        r.text("The attackers and their threat models (src/distillarena/attacks/spec.py): what each knows beyond "
               "the traces it bought (defense: the defense's kind and the parameters the teacher sampled with; "
               "proxy: the defense's public proxy model; verifier: the problems' answers; holdout: clean holdout "
               "texts), and the teacher queries it spends.", note=True)
        r.table(["attacker", "what it trains on", "knows", "needs log-probs", "teacher queries", "objective"],
                threat_models(cfg.attackers, cfg.budget))
    r.figure(worst_case_figure(summary_rows, worst, attackers),
             "Per defense kind and strength, the recovery of every attacker (thin; passive dashed) and the worst case "
             "over them (thick black: the attacker with the highest R at that strength, named). Attackers are "
             "budget-matched (the same teacher queries). The maximum of noisy estimates is biased upwards (the "
             "winner's curse): read the paired intervals below before calling an attacker the winner.")
    r.text("R(winner) - R(passive) and R(winner) - R(runner-up) are paired bootstrap 95% intervals (seeds and test "
           "problems resampled together, each attacker's R over its own undefended reference); 'yes' when the "
           "interval excludes 0 on the winner's side, 'inconclusive' when it straddles 0.", note=True)
    rows = []
    for w in worst:
        vp, vr = w.get("vs_passive") or {}, w.get("vs_runner_up") or {}
        rows.append([w["defense_label"], w.get("teacher_accuracy"), _ci(w.get("passive_recovery")),
                     w.get("attacker") or "–", _ci(w.get("recovery_ci") or {"mean": w.get("recovery")}),
                     _ci(vp.get("recovery_difference"), signed=True), vp.get("verdict", "–"),
                     _ci(vp.get("accuracy_difference"), 3, signed=True), vr.get("attacker", "–"),
                     _ci(vr.get("recovery_difference"), signed=True), vr.get("verdict", "–"),
                     ", ".join(w.get("skipped") or []) or "–"])
    r.table(["defense", "teacher acc", "passive R [95% CI]", "worst case: attacker", "its R [95% CI]",
             "R(worst) - R(passive)", "beats passive?", "accuracy gap vs passive", "runner-up",
             "R(worst) - R(runner-up)", "beats runner-up?", "skipped"], rows)
    r.heading("Who wins against which defense (R [95% CI] per attacker)")
    header = ["defense"] + attackers
    table = []
    for w in worst:
        rec = w.get("recoveries") or {}
        table.append([w["defense_label"]] + [("★ " if a == w.get("attacker") else "") + _ci(rec.get(a))
                                             for a in attackers])
    r.table(header, table)
    notes = sorted({f"{w['defense_label']} / {a}: {why}" for w in worst for a, why in
                    (w.get("skip_reasons") or {}).items()})
    if notes:
        r.text("Skipped cells: " + "; ".join(notes), note=True)
