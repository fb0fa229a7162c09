"""``rationalize``: against withheld reasoning, the student writes the reasoning itself and keeps what reaches the
revealed answer (rationalization, as STaR's), then trains on those chains.

For each trace that shows no reasoning line (``when: no_reasoning``; ``always``: every trace with a stated answer),
the student samples up to ``samples`` completions of its prompt at ``temperature`` (seeded by the cell's seed); the
first whose stated answer is the *revealed* answer replaces the trace's text, cut after its answer line. The
attacker needs no verifier: the target is what the teacher revealed (right or wrong), read with the task's public
answer format. A trace no sample rationalises is kept as revealed (``fallback: keep``) or dropped (``drop``). The
student's samples cost no teacher query; their number is in the cell's record (``student_samples``).

The answers-alone student it is compared with is ``passive`` on the same traces.
"""

from __future__ import annotations

import torch

from distillarena.attacks.plan import AttackContext, Plan, Replacement
from distillarena.attacks.spec import RationalizeParams
from distillarena.decoding import sample
from distillarena.models.tokenizer import left_padding


def shows_reasoning(text: str, marker: str) -> bool:
    """A non-empty line before the first line holding the answer marker (or anywhere, without one)."""
    for line in text.split("\n"):
        if marker in line:
            return False
        if line.strip():
            return True
    return False


def through_answer(text: str, marker: str) -> str:
    """``text`` up to and including its first answer line."""
    lines = text.split("\n")
    for j, line in enumerate(lines):
        if marker in line:
            return "\n".join(lines[: j + 1])
    return text


@torch.no_grad()
def plan(ctx: AttackContext, params: RationalizeParams) -> Plan:
    task, tok, model = ctx.task, ctx.tokenizer, ctx.student
    marker = task.answer_prefix.strip() or task.answer_prefix
    target: dict[int, object] = {}
    for i, r in enumerate(ctx.records):
        if params.when == "always" or not shows_reasoning(r["completion"], marker):
            answer = task.extract_answer(r["completion"])
            if answer is not None:
                target[i] = answer
    gen = torch.Generator().manual_seed(ctx.seed)
    found: dict[int, str] = {}
    drawn = 0
    was_training = model.training
    model.eval()
    try:
        for _ in range(params.samples):
            todo = [i for i in target if i not in found]
            for start in range(0, len(todo), 64):
                part = todo[start : start + 64]
                with left_padding(tok):
                    enc = tok([ctx.records[i]["prompt"] for i in part], return_tensors="pt", padding=True)
                device = next(model.parameters()).device
                res = sample(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                             max_new_tokens=ctx.cfg.max_new_tokens, temperature=params.temperature, generator=gen,
                             eos_token_id=tok.eos_token_id, pad_token_id=ctx.pad_id)
                drawn += len(part)
                for i, text in zip(part, res.texts(tok), strict=True):
                    if task.extract_answer(text) == target[i] and shows_reasoning(text, marker):
                        found[i] = through_answer(text, marker)
    finally:
        model.train(was_training)
    keep = [i for i in range(ctx.n) if not (params.fallback == "drop" and i in target and i not in found)]
    info = {"rationalize_targets": len(target), "rationalized": len(found), "student_samples": drawn,
            "rationalized_share": len(found) / len(target) if target else None}
    if not keep:
        info["rationalize_fallback"] = "nothing rationalised and fallback drop: trained on every trace as revealed"
        keep = list(range(ctx.n))
    return Plan.uniform(keep, info=info, replace={i: Replacement(completion=t) for i, t in found.items()})
