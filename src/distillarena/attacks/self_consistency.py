"""``self_consistency``: k samples of each of budget // k prompts (the same number of teacher queries as every other
attacker), and the traces whose final answer is the prompt's majority (plurality) answer.

Needs no verifier: the answers are read with the task's public answer format (``Task.extract_answer``). Ties go
to the answer seen first; a prompt with no stated answer in any sample is dropped. ``keep: one`` trains on one
trace of the majority answer per prompt instead of all of them. If no prompt has an answer, the student trains on
every trace (as passive) and the cell says so.
"""

from __future__ import annotations

from collections import Counter

from distillarena.attacks.plan import AttackContext, Plan
from distillarena.attacks.spec import SelfConsistencyParams


def majority(answers: list[object]) -> object | None:
    """The most frequent non-None answer (the first seen among ties), None if there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def plan(ctx: AttackContext, params: SelfConsistencyParams) -> Plan:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(ctx.records):
        groups.setdefault(r["prompt"], []).append(i)
    keep: list[int] = []
    agree = []
    for idx in groups.values():
        answers = [ctx.task.extract_answer(ctx.records[i]["completion"]) for i in idx]
        answers = [None if a is None else str(a) for a in answers]
        best = majority(answers)
        if best is None:
            continue
        chosen = [i for i, a in zip(idx, answers, strict=True) if a == best]
        agree.append(len(chosen) / len(idx))
        keep.extend(chosen[:1] if params.keep == "one" else chosen)
    info = {"prompts": len(groups), "samples_per_prompt": ctx.samples_per_prompt,
            "prompts_with_answer": len(agree), "majority_share": sum(agree) / len(agree) if agree else None}
    if not keep:
        info["self_consistency_fallback"] = "no sample stated an answer: trained on all of them"
        return Plan.uniform(list(range(ctx.n)), info=info)
    return Plan.uniform(sorted(keep), info=info)
