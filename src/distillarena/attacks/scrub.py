"""``scrub``: launder the traces through the student's own words before training on them (the paraphrasing attack
on a watermark, Pan et al. 2025): each reasoning line is rewritten, with probability ``strength``, by the line the
student itself samples in its place (``ctx.paraphrase``, the project's one line-by-line rewriter); the revealed
answer line is kept. Tokens the student wrote carry none of the teacher's green-list bias, so a radioactivity test
has less to find; the price is that a weak student's lines may be wrong. No teacher query is spent; the student's
rewrites are counted in the cell's record (``student_samples``)."""

from __future__ import annotations

from distillarena.attacks.plan import AttackContext, Plan, Replacement
from distillarena.attacks.spec import ScrubParams
from distillarena.core.errors import UserError


def plan(ctx: AttackContext, params: ScrubParams) -> Plan:
    if ctx.paraphrase is None:
        raise UserError("attacker scrub needs the game's rewriter (AttackContext.paraphrase)")
    prompts = [r["prompt"] for r in ctx.records]
    texts = [r["completion"] for r in ctx.records]
    done = ctx.paraphrase(prompts, texts, ctx.student, ctx.tokenizer, strength=params.strength, seed=ctx.seed,
                          temperature=params.temperature)
    changed = {i: text for i, (text, lines) in enumerate(done) if lines}
    info = {"scrubbed_traces": len(changed), "scrubbed_lines": sum(lines for _, lines in done),
            "student_samples": sum(lines for _, lines in done)}
    return Plan.uniform(list(range(ctx.n)), info=info,
                        replace={i: Replacement(completion=t) for i, t in changed.items()})
