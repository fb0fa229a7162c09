"""The one table of attacker kinds: each kind's parameters (a pydantic model), its declared threat model, and where
its planning code lives.

Torch-free (like :mod:`distillarena.defenses.spec`), so a game config validates every attacker the moment its YAML
is read. What each kind *does* is its module's ``plan(ctx, params) -> Plan`` (see :mod:`distillarena.attacks.plan`
for what a plan receives and returns), imported on first use from :attr:`AttackerSpec.planner`.

==================  ===========================================================================================
kind                what the student trains on
==================  ===========================================================================================
``passive``         every trace, uniform weights
``adaptive``        the paper's value tilt, unchanged: ``exp(beta * sign * clip(z))`` of the finite-difference
                    value at the untrained student, reference-solution holdout (kept for comparison)
``filter``          the paper's value filter, unchanged: the ``keep`` fraction of highest value
``value_tilt``      the value tilt made competent: valued after a passive warm start, refreshed every K steps,
                    cosine-normalised value, the undefended teacher's holdout traces (``form: paper``: as
                    ``adaptive``)
``verifier_filter`` the traces a checker accepts (final answer / step validity, a regex or a callable)
``self_consistency`` k samples per prompt on budget / k prompts; the traces of each prompt's majority answer
``invert_temperature`` the revealed top-k with the known sampling temperature undone (KD on the recovered rows)
``invert_poe``      the revealed top-k with PoE's public proxy and the temperature undone (KD on the recovered rows)
``nll_filter``      the ``keep`` fraction of traces the student finds most (or least) likely
``rationalize``     where a trace shows no reasoning, the student's own chain that reaches the revealed answer
==================  ===========================================================================================

Adding an attacker: a module ``attacks/<kind>.py`` with ``plan(ctx, params)``, and one :class:`AttackerSpec` entry
here (its parameters model and threat model). Game configs, labels, cache keys, the sweep and the report follow.
(``/tmp/coord/ATTACKERS.md`` was the hand-over note; ``docs/architecture.md`` has the same.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- parameters ---------------------------------------------------------------------------------------------------


class AttackerParams(BaseModel):
    """Base of every kind's parameters: unknown names are refused."""

    model_config = ConfigDict(extra="forbid")


class PaperParams(AttackerParams):
    """The paper's adaptive / filter students as the game always had them (every field accepted by every one of
    the three original kinds, so old configs keep loading and keep their cache keys)."""

    beta: float = Field(1.0, ge=0, description="tilt strength")
    sign: Literal[1, -1] = Field(1, description="1: upweight traces whose training lowers the holdout loss; -1: "
                                 "the reference code's sign")
    clip: float = Field(3.0, gt=0)
    standardize: bool = True
    eps: float = Field(1e-2, gt=0, description="finite-difference step along the unit holdout gradient")
    keep: float = Field(0.5, gt=0, le=1, description="fraction kept by the filter")


class ValueTiltParams(AttackerParams):
    """The value-tilting student. ``form: paper`` is exactly ``adaptive`` (value at the untrained student, the
    finite-difference projection, reference-solution holdout); ``form: competent`` (default) values after
    ``warm_fraction`` of the training steps trained passively, refreshes every ``refresh_every`` steps (0: never),
    uses the ``value`` measure (``cosine``: the cosine between each trace's NLL gradient and the holdout gradient,
    which removes the gradient-norm confound; ``projection``: the finite-difference projection on the unit holdout
    gradient) and the ``holdout`` texts (``teacher``: the undefended teacher's completions of holdout prompts, as
    the reference code; ``reference``: the task's reference solutions)."""

    form: Literal["competent", "paper"] = "competent"
    beta: float = Field(0.5, ge=0)
    sign: Literal[1, -1] = 1
    clip: float = Field(3.0, gt=0)
    eps: float = Field(1e-2, gt=0, description="finite-difference step (value: projection)")
    value: Literal["cosine", "projection"] = "cosine"
    warm_fraction: float = Field(0.2, ge=0, lt=1, description="the fraction of the training steps trained "
                                 "passively before the first valuation (0: value the untrained student)")
    refresh_every: int = Field(0, ge=0, description="revalue every this many steps after the warm start (0: never)")
    holdout: Literal["teacher", "reference"] = "teacher"
    keep: float = Field(1.0, gt=0, le=1, description="< 1: keep only this fraction of highest value (uniform)")


class VerifierParams(AttackerParams):
    """``check``: what the task's checker must accept (``answer``: the final answer is the problem's; ``steps``:
    every reasoning step is valid; ``both``). ``pattern``: a regex the completion must match (searched), and
    ``callable``: ``module:function`` taking ``(prompt, completion)`` and returning True to keep, for a user's
    task; given either, ``check`` defaults to ``none``."""

    check: Literal["answer", "steps", "both", "none"] | None = None
    min_step_validity: float = Field(1.0, ge=0, le=1, description="steps: the fraction of valid steps required")
    pattern: str | None = None
    callable: str | None = Field(None, description="module:function, called as f(prompt, completion) -> bool")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"is not a valid regular expression: {e}") from None
        return v

    @field_validator("callable")
    @classmethod
    def _dotted(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"must be 'module:function', got {v!r}")
        return v

    def checks(self) -> str:
        if self.check is not None:
            return self.check
        return "none" if (self.pattern or self.callable) else "answer"


class SelfConsistencyParams(AttackerParams):
    k: int = Field(4, ge=2, le=64, description="samples per prompt (on budget // k prompts)")
    keep: Literal["majority", "one"] = Field("majority", description="every trace of the majority answer, or one")


class InvertParams(AttackerParams):
    """``target_temperature``: the temperature of the teacher distribution the recovered rows are (1: the model's
    own). The recovered rows are renormalised over the revealed tokens (the tail's shape is not revealed)."""

    target_temperature: float = Field(1.0, gt=0)


class NLLFilterParams(AttackerParams):
    keep: float = Field(0.5, gt=0, le=1)
    prefer: Literal["low", "high"] = Field("low", description="low: the traces the student finds most likely")


class RationalizeParams(AttackerParams):
    samples: int = Field(4, ge=1, le=64, description="student samples per trace at most, until one states the "
                         "revealed answer")
    temperature: float = Field(1.0, gt=0)
    when: Literal["no_reasoning", "always"] = Field("no_reasoning", description="rationalise the traces that show "
                                                     "no reasoning line, or every trace")
    fallback: Literal["keep", "drop"] = Field("keep", description="a trace no sample rationalises: kept as "
                                              "revealed, or dropped")


class ScrubParams(AttackerParams):
    strength: float = Field(1.0, ge=0, le=1, description="share of each trace's reasoning lines the student "
                            "rewrites (1: all of them)")
    temperature: float = Field(1.0, ge=0, description="the student's sampling temperature when rewriting (0: greedy)")


# --- the table ----------------------------------------------------------------------------------------------------

KNOWLEDGE = {
    "defense": "the defense's kind and the parameters the teacher sampled with (decoding included)",
    "proxy": "the defense's public proxy model",
    "verifier": "a checker of answers (the problem's answer) or steps",
    "holdout": "clean holdout texts (the undefended teacher's holdout completions or reference solutions)",
}


@dataclass(frozen=True)
class Spend:
    """What an attacker spends of the budget: ``prompts`` distinct prompts, ``samples_per_prompt`` completions of
    each; ``queries = prompts * samples_per_prompt <= budget``."""

    prompts: int
    samples_per_prompt: int

    @property
    def queries(self) -> int:
        return self.prompts * self.samples_per_prompt


def _generic_label(kind: str, params: AttackerParams, shown: tuple[str, ...] | None = None) -> str:
    """``kind(name=value, ...)`` over the parameters set away from their defaults (all of ``shown`` if given)."""
    defaults = type(params)()
    names = shown if shown is not None else tuple(type(params).model_fields)
    inner = []
    for n in names:
        v = getattr(params, n)
        if shown is None and v == getattr(defaults, n):
            continue
        inner.append(f"{n}={v:g}" if isinstance(v, float) else f"{n}={v}")
    return f"{kind}({', '.join(inner)})" if inner else kind


def _adaptive_label(kind: str, p: PaperParams) -> str:
    return f"adaptive(beta={p.beta:g}{'' if p.sign == 1 else ', sign=-1'})"


def _filter_label(kind: str, p: PaperParams) -> str:
    return f"filter(keep={p.keep:g}{'' if p.sign == 1 else ', sign=-1'})"


def _value_tilt_label(kind: str, p: ValueTiltParams) -> str:
    # the sign is always shown, so a sweep lists both signs side by side
    rest = _generic_label(kind, p)[len(kind):].strip("()")
    rest = ", ".join(x for x in rest.split(", ") if x and not x.startswith("sign="))
    return f"value_tilt(sign={p.sign:+d}{', ' + rest if rest else ''})"


@dataclass(frozen=True)
class AttackerSpec:
    """One attacker kind.

    params:          its parameters (unknown names and bad values are refused when a config loads);
    planner:         ``module:function`` of its ``plan(ctx, params) -> Plan``;
    knows:           what it knows beyond the traces it bought (keys of :data:`KNOWLEDGE`);
    needs_logprobs:  it needs the revealed top-k log-probs (skipped, with the reason, where none are revealed);
    samples_param:   the parameter holding its samples per prompt (None: one);
    objective:       its default training objective (``sft``: text; ``fkl``: the revealed / recovered top-k);
    uses_oracle:     it runs the game's one-step oracle check of its values (``oracle`` settings in its cell key);
    """

    kind: str
    params: type[AttackerParams]
    summary: str
    planner: str
    knows: tuple[str, ...] = ()
    needs_logprobs: bool = False
    samples_param: str | None = None
    objective: str = "sft"
    uses_oracle: bool = False
    label_fn: Callable[[str, Any], str] | None = field(default=None, repr=False)

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.params.model_fields)

    def samples_per_prompt(self, params: AttackerParams) -> int:
        return int(getattr(params, self.samples_param)) if self.samples_param else 1

    def spend(self, params: AttackerParams, budget: int) -> Spend:
        k = self.samples_per_prompt(params)
        return Spend(budget // k, k)

    def label(self, params: AttackerParams) -> str:
        return self.label_fn(self.kind, params) if self.label_fn else _generic_label(self.kind, params)


_PAPER = ("holdout",)
ATTACKERS: dict[str, AttackerSpec] = {
    "passive": AttackerSpec("passive", PaperParams, "every trace, uniform weights",
                            "distillarena.attacks.passive:plan", label_fn=lambda k, p: "passive"),
    "adaptive": AttackerSpec("adaptive", PaperParams, "the paper's value tilt (untrained student, reference holdout)",
                             "distillarena.attacks.value_tilt:plan_adaptive", knows=_PAPER, uses_oracle=True,
                             label_fn=_adaptive_label),
    "filter": AttackerSpec("filter", PaperParams, "the paper's value filter: the keep fraction of highest value",
                           "distillarena.attacks.value_tilt:plan_filter", knows=_PAPER, uses_oracle=True,
                           label_fn=_filter_label),
    "value_tilt": AttackerSpec("value_tilt", ValueTiltParams,
                               "value tilt after a passive warm start (cosine value, teacher holdout)",
                               "distillarena.attacks.value_tilt:plan", knows=_PAPER, uses_oracle=True,
                               label_fn=_value_tilt_label),
    "verifier_filter": AttackerSpec("verifier_filter", VerifierParams, "the traces a checker accepts",
                                    "distillarena.attacks.verifier:plan", knows=("verifier",)),
    "self_consistency": AttackerSpec("self_consistency", SelfConsistencyParams,
                                     "k samples per prompt, the majority answer's traces",
                                     "distillarena.attacks.self_consistency:plan", samples_param="k",
                                     label_fn=lambda k, p: _generic_label(k, p, ("k",)) if p.keep == "majority"
                                     else _generic_label(k, p, ("k", "keep"))),
    "invert_temperature": AttackerSpec("invert_temperature", InvertParams,
                                       "revealed top-k with the sampling temperature undone",
                                       "distillarena.attacks.invert:plan_temperature", knows=("defense",),
                                       needs_logprobs=True, objective="fkl"),
    "invert_poe": AttackerSpec("invert_poe", InvertParams, "revealed top-k with PoE's proxy and temperature undone",
                               "distillarena.attacks.invert:plan_poe", knows=("defense", "proxy"),
                               needs_logprobs=True, objective="fkl"),
    "nll_filter": AttackerSpec("nll_filter", NLLFilterParams, "the keep fraction the student finds most likely",
                               "distillarena.attacks.nll_filter:plan"),
    "rationalize": AttackerSpec("rationalize", RationalizeParams, "the student's own reasoning toward each revealed "
                                "answer, where the traces show none (rationalization)",
                                "distillarena.attacks.rationalize:plan"),
    "scrub": AttackerSpec("scrub", ScrubParams, "every trace's reasoning rewritten line by line by the student "
                          "itself before training (paraphrasing away a watermark), the revealed answer kept",
                          "distillarena.attacks.scrub:plan"),
}
ATTACKER_KINDS: tuple[str, ...] = tuple(ATTACKERS)
AttackerKind = Literal[ATTACKER_KINDS]  # type: ignore[valid-type]  # built from the table, so it cannot drift


def attacker_spec(kind: str) -> AttackerSpec:
    try:
        return ATTACKERS[kind]
    except KeyError:
        raise ValueError(f"unknown attacker {kind!r}; expected one of {', '.join(ATTACKER_KINDS)}") from None


def attacker_params(kind: str, params: dict[str, Any]) -> AttackerParams:
    """The validated parameters of ``kind``; ``pydantic.ValidationError`` (located at the parameter) if bad."""
    return attacker_spec(kind).params.model_validate(params)


__all__ = ["ATTACKERS", "ATTACKER_KINDS", "AttackerKind", "AttackerParams", "AttackerSpec", "KNOWLEDGE", "Spend",
           "attacker_params", "attacker_spec"]
