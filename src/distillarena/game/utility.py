"""The teacher's utility as a legitimate user feels it, for every defense: what a user who reads the answer *and*
the reasoning gets from the defended teacher on the attacker's queries.

Per trace (what the API revealed, checked against the problem):

- ``correct``: the final answer is right (final-answer accuracy: blind to the reasoning, so it rates "hide the
  reasoning" as free);
- ``step_validity``: the share of reasoning lines that are valid steps (the task's checker; no step line: 0);
- ``checkable``: the answer shows reasoning a reader can check: at least one reasoning line, every line a valid step,
  and the last step's result is the stated answer (a chain that leads somewhere else, or nowhere, does not let the
  reader check the answer); None for a task without checkable steps;
- the KL to the undefended teacher, per token, where it is defined: for sampling defenses (the teacher's own
  distribution is known at every sampled token); undefined (None) for output-level defenses, whose revealed tokens
  are not sampled from any distribution of the teacher's.

:func:`utility_meta` puts their means and per-trace strings (paired intervals over the same prompts) into a trace
collection's ``meta.json``; :func:`utility_table` turns the game's rows into one row per defense setting: each
utility with its 95% interval, and its paired difference to the undefended teacher (same prompts and seeds), next
to the student's recovery (DistillGuard's two axes: distillation effectiveness and the cost to legitimate users).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from distillarena.defenses.rewrite import split_reasoning
from distillarena.report.stats import bootstrap_mean, finite, paired_difference

# The utilities the frontier can be drawn against: (key of a summary row, axis label).
UTILITIES: dict[str, str] = {
    "teacher_accuracy": "final-answer accuracy of the teacher's answers",
    "teacher_step_validity": "step validity of the teacher's revealed reasoning",
    "teacher_checkable": "share of the teacher's answers with checkable reasoning",
}
# per-trace strings / lists in meta.json, by utility
_PER_TRACE = {"teacher_accuracy": "trace_correct", "teacher_step_validity": "trace_step_validity",
              "teacher_checkable": "trace_checkable"}


def checkable(text: str, task) -> bool | None:
    """The answer shows reasoning a reader can check (see the module docstring)."""
    validity = task.step_validity(text)
    if validity is None:
        return None
    reasoning, _ = split_reasoning(text, task)
    answer = task.extract_answer(text)
    if not reasoning or answer is None or validity < 1.0:
        return False
    return reasoning[-1].rsplit("=", 1)[-1].strip() == str(answer)


def utility_meta(records: list[dict[str, Any]], task) -> dict[str, Any]:
    """The user-felt utilities of a trace collection for its ``meta.json``: means, per-trace ``trace_checkable``
    (a 0/1 string like ``trace_correct``), and the rewrite's marks' shares where the defense set them."""
    n = max(len(records), 1)
    flags = [checkable(r["completion"], task) for r in records]
    out: dict[str, Any] = {
        "teacher_checkable": (sum(bool(f) for f in flags) / n) if all(f is not None for f in flags) else None,
        "trace_checkable": "".join("1" if f else "0" for f in flags) if all(f is not None for f in flags) else None,
        "teacher_reasoning_lines": sum(len(split_reasoning(r["completion"], task)[0]) for r in records) / n,
    }
    for mark, key in (("poisoned", "poisoned_fraction"), ("changed", "changed_fraction")):
        if records and all(mark in r for r in records):
            out[key] = sum(bool(r[mark]) for r in records) / n
    if records and all("teacher_completion" in r for r in records):
        out["teacher_accuracy_before_rewrite"] = sum(
            task.extract_answer(r["teacher_completion"]) == r["answer"] for r in records) / n
    return out


def _trace_values(meta_row: dict[str, Any], utility: str) -> np.ndarray | None:
    v = meta_row.get(_PER_TRACE[utility])
    if v is None:
        return None
    if isinstance(v, str):
        return np.frombuffer(v.encode(), dtype=np.uint8).astype(np.float64) - ord("0")
    return np.asarray(v, dtype=np.float64)


def utility_table(rows: list[dict[str, Any]], summary_rows: list[dict[str, Any]] | None = None
                  ) -> list[dict[str, Any]]:
    """One row per defense setting of the game's ``rows`` (cells; the teacher's utilities do not depend on the
    attacker, so each (setting, seed) counts once): each utility as a mean with its 95% bootstrap interval over
    seeds and prompts, its paired difference to the undefended teacher on the same prompts and seeds, the KL to the
    undefended teacher where defined, and from ``summary_rows`` each attacker's recovery R and accuracy gain."""
    per: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    order: list[str] = []
    for r in rows:
        label = r["defense_label"]
        if label not in per:
            order.append(label)
        per[label].setdefault(r["seed"], r)
    ref_label = next((r["defense_label"] for r in rows if r.get("undefended_reference")), None)
    ref = per.get(ref_label, {}) if ref_label is not None else {}
    out = []
    for label in order:
        by_seed = per[label]
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        row: dict[str, Any] = {"defense_label": label, "defense": first["defense"], "seeds": seeds,
                               "undefended_reference": bool(first.get("undefended_reference"))}
        for u in UTILITIES:
            x = [_trace_values(by_seed[s], u) for s in seeds]
            if any(v is None for v in x) or len({v.size for v in x}) != 1:
                row[u] = None
                continue
            xm = np.stack(x)
            row[u] = bootstrap_mean(xm).as_dict()
            y = [_trace_values(ref[s], u) if s in ref else None for s in seeds]
            if ref and not row["undefended_reference"] and all(v is not None and v.size == xm.shape[1] for v in y):
                row[f"{u}_vs_undefended"] = paired_difference(xm, np.stack(y)).as_dict()
        kls = [by_seed[s].get("teacher_kl") for s in seeds]
        row["teacher_kl"] = float(np.mean(kls)) if all(finite(k) for k in kls) else None
        for k in ("poisoned_fraction", "changed_fraction", "teacher_reasoning_lines"):
            vals = [by_seed[s].get(k) for s in seeds]
            row[k] = float(np.mean(vals)) if all(finite(v) for v in vals) else None
        row["attackers"] = {s["attacker"]: {"recovery_ci": s.get("recovery_ci"), "gain": s.get("gain"),
                                            "student_accuracy": s.get("student_accuracy")}
                            for s in (summary_rows or []) if s["defense_label"] == label}
        out.append(row)
    return out


def format_interval(d: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean [low, high]`` of an interval dict (``–`` if absent)."""
    if not d or not finite(d.get("mean")):
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(d['mean'])} [{f.format(d['ci_low'])}, {f.format(d['ci_high'])}]"


__all__ = ["UTILITIES", "checkable", "format_interval", "utility_meta", "utility_table"]
