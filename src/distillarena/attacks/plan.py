"""What an attacker's ``plan(ctx, params)`` receives (:class:`AttackContext`) and returns (:class:`Plan`).

The game (:mod:`distillarena.game.attack`) builds the context of one cell, calls the kind's planner (named in
:data:`distillarena.attacks.spec.ATTACKERS`), applies the plan's replacements, and trains the student in the
project's one loop on the kept traces with the plan's weights, calling ``plan.reweigh`` during training if given.

Honesty: ``ctx.records`` hold what the attacker bought and nothing of the referee's (no ``correct``, ``answer``,
``step_validity``, undefended log-probs or KL). An attacker that uses the problems' answers (``ctx.problems``) or the
defense's parameters must declare it in its spec's ``knows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

EncodedPair = tuple[list[int], list[int]]

#: trace fields the referee computes and the attacker does not see
REFEREE_FIELDS = ("correct", "answer", "step_validity", "teacher_logprobs", "kl_to_undefended", "forced")


def attacker_view(record: dict[str, Any]) -> dict[str, Any]:
    """A trace record as the attacker received it (the referee's fields removed)."""
    return {k: v for k, v in record.items() if k not in REFEREE_FIELDS}


@dataclass
class Replacement:
    """A trace replaced by the attacker (a paraphrase, a rationalisation, recovered log-probs):

    completion: a new completion text for the trace's prompt (re-encoded by the game; text objectives only);
    encoded:    or the new example directly, ``(ids, labels)`` with labels ``-100`` on the prompt;
    top:        new top-k rows ``(ids [T, k] long, log-probs [T, k] float)`` aligned with the target tokens of the
                (possibly replaced) example, for objectives that learn from top-k log-probs.
    """

    completion: str | None = None
    encoded: EncodedPair | None = None
    top: tuple[Any, Any] | None = None


class Reweigh(Protocol):
    """Called by the training loop every ``every`` steps with the model being trained: new weights for
    ``plan.keep`` (mean 1), or None to keep them."""

    every: int

    def __call__(self, model: Any, step: int) -> list[float] | None: ...


@dataclass
class Plan:
    """What the student trains on.

    keep:     indices of the traces trained on (into ``ctx.records``);
    weights:  one weight per kept trace (scales each of its tokens; mean 1 keeps the passive scale);
    info:     numbers for the cell's record (``cell.json``);
    values:   one value per trace, if the attacker valued them (``values.json``);
    replace:  trace index -> :class:`Replacement`;
    reweigh:  weights recomputed during training (value refreshes);
    skipped:  a reason not to train at all (e.g. no log-probs revealed): the cell is recorded as skipped.
    """

    keep: list[int]
    weights: list[float]
    info: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    replace: dict[int, Replacement] = field(default_factory=dict)
    reweigh: Reweigh | None = None
    skipped: str | None = None

    @classmethod
    def uniform(cls, keep: list[int], **kw: Any) -> Plan:
        return cls(list(keep), [1.0] * len(keep), **kw)

    @classmethod
    def skip(cls, reason: str) -> Plan:
        return cls([], [], skipped=reason)


@dataclass
class AttackContext:
    """Everything one cell's attacker may use.

    records:     the traces bought, as revealed (``prompt``, ``completion``, ``tokens``, ``logprobs`` of the sampled
                 tokens, ``top_ids`` / ``top_logprobs`` if revealed, ``index``: the prompt's position in the pool);
                 ``samples_per_prompt`` consecutive records per prompt;
    encoded:     each record as the attacker's objective encodes it (text: the completion re-encoded; top-k
                 objectives: prompt ids + sampled tokens);
    topk:        the revealed top-k rows aligned with ``encoded`` (a ``RevealedTopK``; None for text objectives);
    student:     the student before training (a copy: a plan may run it, and must leave its weights as found);
    tokenizer, pad_id;
    task, problems: the task and each record's problem (``problems[i].answer`` is verifier knowledge);
    defense:     the cell's ``DefenseConfig`` (kind, params, proxy); ``sampling``: the parameters the teacher
                 sampled with (the defense's over the game's decoding): defense knowledge;
    cfg:         the ``GameConfig``; ``seed``; ``objective`` (the attacker's training objective);
    holdout:     ``holdout(source)`` -> encoded holdout examples (``teacher``: the undefended teacher's completions
                 of holdout prompts; ``reference``: reference solutions);
    load_model:  ``load_model(model_ref)`` -> ``(model, tokenizer)`` (e.g. the defense's public proxy);
    over_api:    the traces came over HTTP;
    budget:      teacher queries allowed; ``samples_per_prompt``: the collection's samples per prompt;
    paraphrase:  ``paraphrase(prompts, completions, model, tokenizer, *, strength, seed, temperature)`` -> one
                 ``(text, lines rewritten)`` per completion: the project's line-by-line rewriter
                 (``defenses.paraphrase.paraphrase_lines``) bound to the task, with any model the attacker holds as
                 the rewriter (e.g. its own student, to launder a watermark).

    A secret parameter of the defense (the watermark's key) reaches the attacker only as a digest, in ``records``,
    ``defense`` and ``sampling`` alike: knowing the defense means knowing the scheme and its settings, not the key.
    """

    records: list[dict[str, Any]]
    encoded: list[EncodedPair]
    topk: Any | None
    student: Any
    tokenizer: Any
    pad_id: int
    task: Any
    problems: list[Any]
    defense: Any
    sampling: dict[str, Any]
    cfg: Any
    seed: int
    objective: str
    holdout: Callable[[str], list[EncodedPair]]
    load_model: Callable[[Any], tuple[Any, Any]]
    over_api: bool = False
    budget: int = 0
    samples_per_prompt: int = 1
    paraphrase: Callable[..., list[tuple[str, int]]] | None = None

    @property
    def n(self) -> int:
        return len(self.records)


Planner = Callable[[AttackContext, Any], Plan]

__all__ = ["REFEREE_FIELDS", "AttackContext", "EncodedPair", "Plan", "Planner", "Replacement", "Reweigh",
           "attacker_view"]
