"""The one table of defense kinds: each kind's parameters (a pydantic model), its main parameter, what it needs.

Torch-free, so that configs (the game's ``DefenseConfig``, the server's key ``PolicyConfig``) and the key commands
validate a defense the moment a YAML file or a command line is read, without importing torch. What each kind
*samples* is built from this table by :func:`distillarena.defenses.policy.build_policy`:

==================  =========================================================================================
kind                what is sampled (``z`` = teacher logits)
==================  =========================================================================================
``none``            softmax(z / temperature) (temperature 1 by default: the undefended teacher)
``temperature``     softmax(z / temperature)
``truncation``      top-k and/or top-p truncation of softmax(z / temperature)
``poe``             softmax(((1 - gamma) z + gamma z_proxy) / temperature)
``antidistillation`` softmax(z / temperature + lam * b), b from the proxy's cached holdout gradient
``watermark``       softmax((z + delta * green) / temperature), green a keyed list of the previous tokens
==================  =========================================================================================

Output-level kinds (``rewrites_text``) sample softmax(z / temperature) and then rewrite the decoded text:
``answer_only``, ``truncate_reasoning``, ``summary``, ``paraphrase``, ``poison``, ``poison_scored`` (what each does
is its entry's summary below; ``build_policy`` builds their rewrites, see :mod:`distillarena.defenses.rewrite`).

Every kind also takes ``top_p`` (nucleus truncation of what it samples), so a defense can be played at the
teacher's own decoding.

Adding a defense: a parameters model and one :class:`DefenseSpec` entry here, and its processor in
``build_policy`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator


def _finite_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v!r}")
    return float(v)


Number = Annotated[float, BeforeValidator(_finite_number)]


class DefenseParams(BaseModel):
    """Parameters every kind takes: the sampling temperature and nucleus (top-p) truncation applied with the
    defense (the teacher's own decoding, e.g. the papers' temperature 0.6 and top-p 0.95)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Number = 1.0
    top_p: Number | None = None

    @field_validator("temperature")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        return v

    @field_validator("top_p")
    @classmethod
    def _p(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1], got {v:g}")
        return v


class TruncationParams(DefenseParams):
    top_k: Number | None = None

    @field_validator("top_k")
    @classmethod
    def _k(cls, v: float | None) -> float | None:
        if v is not None and (v < 1 or int(v) != v):
            raise ValueError(f"must be an integer >= 1, got {v:g}")
        return v


class PoEParams(DefenseParams):
    gamma: Number = 0.5

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v:g}")
        return v


class TruncateReasoningParams(DefenseParams):
    steps: int = 1

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> int:
        return _count(v, 0)


class SummaryParams(DefenseParams):
    lines: int = 1

    @field_validator("lines", mode="before")
    @classmethod
    def _lines(cls, v: Any) -> int:
        return _count(v, 1)


class ParaphraseParams(DefenseParams):
    strength: Number = 0.5
    rewriter_temperature: Number = 1.0

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v:g}")
        return v

    @field_validator("rewriter_temperature")
    @classmethod
    def _rewriter_temperature(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        return v


class PoisonParams(DefenseParams):
    rate: Number = 0.1
    mode: str = "step"

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v:g}")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("step", "answer"):
            raise ValueError(f"must be 'step' (one wrong step, carried to the answer) or 'answer', got {v!r}")
        return v


class ScoredPoisonParams(PoisonParams):
    eps: Number = 1e-2

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        return v


def _count(v: Any, least: int) -> int:
    """An integer >= ``least`` (a float such as 2.0 from a YAML file or a command line is accepted)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or int(v) != v or v < least:
        raise ValueError(f"must be an integer >= {least}, got {v!r}")
    return int(v)


class AntidistillationParams(DefenseParams):
    lam: Number = 0.0
    method: str = "fd"
    eps: Number = 1e-2
    normalize: str = "unit"

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in ("fd", "jvp"):
            raise ValueError(f"must be 'fd' or 'jvp', got {v!r}")
        return v

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        return v

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, v: str) -> str:
        if v not in ("unit", "none"):
            raise ValueError(f"must be 'unit' or 'none', got {v!r}")
        return v


class WatermarkParams(DefenseParams):
    """Kirchenbauer et al.'s green list (``defenses/watermark.py``): ``delta`` added to the logits of a ``gamma``
    share of the vocabulary chosen by the secret ``key`` and the previous ``context`` tokens."""

    delta: Number = 2.0
    gamma: Number = 0.5
    context: int = 4
    key: str = "distillarena"

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v:g}")
        return v

    @field_validator("gamma")
    @classmethod
    def _green_share(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be in (0, 1), got {v:g}")
        return v

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, v: Any) -> int:
        n = _count(v, 1)
        if n > 64:
            raise ValueError(f"must be at most 64, got {n}")
        return n

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, str | int) or str(v) == "":
            raise ValueError(f"must be a non-empty string (or an integer), got {v!r}")
        return str(v)


@dataclass(frozen=True)
class DefenseSpec:
    """One defense kind.

    params:         its parameters (unknown names and bad values are refused when a config loads);
    main:           the parameter that ``strength`` is shorthand for (server keys, ``keys create --strength``);
    needs_proxy:    it runs a proxy student in lockstep with the teacher (PoE, antidistillation);
    needs_gradient: it needs the proxy's holdout-loss gradient (antidistillation, scored poisoning);
    rewrites_text:  an output-level defense: the teacher samples at the decoding alone, then the decoded text is
                    rewritten (withheld, cut, summarised, paraphrased, poisoned) before anything is revealed. What it
                    can reveal is then the rewritten text only: per-token log-probs and top-k of the rewritten text
                    are not the teacher's (none are revealed), and the KL to the undefended teacher is undefined.
                    A proxy it needs writes or scores text; it does not run in lockstep with the teacher.
    secrets:        parameters that are secrets (the watermark's key): a label shows a digest of them, never the
                    value, because labels reach reports, the ledger and error messages sent to clients.
    """

    kind: str
    params: type[DefenseParams]
    summary: str
    main: str | None = None
    main_help: str = ""
    needs_proxy: bool = False
    needs_gradient: bool = False
    rewrites_text: bool = False
    secrets: tuple[str, ...] = ()

    @property
    def reveals_logprobs(self) -> bool:
        """Whether the teacher's per-token log-probs (and top-k) of what is revealed exist."""
        return not self.rewrites_text

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.params.model_fields)

    def proxy_forwards_per_token(self, params: dict[str, Any]) -> int:
        """Proxy forward passes per generated token: PoE one; antidistillation two (finite differences: the two
        perturbed copies) or one forward-mode pass (``method: jvp``); the rest none."""
        if not self.needs_proxy or self.rewrites_text:  # a rewriting proxy runs after sampling, not per token
            return 0
        if self.needs_gradient:
            return 1 if params.get("method", "fd") == "jvp" else 2
        return 1


DEFENSES: dict[str, DefenseSpec] = {
    "none": DefenseSpec("none", DefenseParams, "the undefended teacher: softmax(z / temperature)"),
    "temperature": DefenseSpec("temperature", DefenseParams, "softmax(z / temperature)",
                               main="temperature", main_help="tau > 0: softmax(z / tau)"),
    "truncation": DefenseSpec("truncation", TruncationParams,
                              "top-k and/or top-p truncation of softmax(z / temperature)"),
    "poe": DefenseSpec("poe", PoEParams, "softmax(((1 - gamma) z + gamma z_proxy) / temperature)", main="gamma",
                       main_help="gamma in [0, 1]: (1 - gamma) z_teacher + gamma z_proxy (default 0.5)",
                       needs_proxy=True),
    "antidistillation": DefenseSpec("antidistillation", AntidistillationParams,
                                    "softmax(z / temperature + lam * b), b from the proxy's holdout gradient",
                                    main="lam", main_help="lambda (finite): z / tau + lambda * b (default 0)",
                                    needs_proxy=True, needs_gradient=True),
    "watermark": DefenseSpec("watermark", WatermarkParams, "softmax((z + delta * green(key, previous `context` "
                             "tokens)) / temperature): the green-list watermark, detectable in a student "
                             "(`distillarena detect`)", main="delta",
                             main_help="delta >= 0: the bias added to the green tokens' logits (default 2)",
                             secrets=("key",)),
    # output-level defenses (defenses/throttle.py, paraphrase.py, poison.py): the decoded text is rewritten
    "answer_only": DefenseSpec("answer_only", DefenseParams, "the final answer line alone, the reasoning withheld",
                               rewrites_text=True),
    "truncate_reasoning": DefenseSpec("truncate_reasoning", TruncateReasoningParams,
                                      "the first `steps` reasoning lines and the final answer line",
                                      main="steps", main_help="reasoning lines kept (integer >= 0; default 1)",
                                      rewrites_text=True),
    "summary": DefenseSpec("summary", SummaryParams, "the reasoning replaced by a `lines`-line extractive summary "
                           "chosen by the proxy (the lines it finds least predictable), and the final answer line",
                           main="lines", main_help="summary lines (integer >= 1; default 1)", needs_proxy=True,
                           rewrites_text=True),
    "paraphrase": DefenseSpec("paraphrase", ParaphraseParams, "each reasoning line rewritten by the proxy with "
                              "probability `strength` (its own line in that context); the final answer line kept",
                              main="strength", main_help="share of reasoning lines rewritten, in [0, 1] "
                              "(default 0.5)", needs_proxy=True, rewrites_text=True),
    "poison": DefenseSpec("poison", PoisonParams, "a `rate` share of the answers, chosen at random, given a plausible "
                          "wrong step carried to a wrong answer (mode step) or a wrong answer (mode answer)",
                          main="rate", main_help="share of answers poisoned, in [0, 1] (default 0.1)",
                          rewrites_text=True),
    "poison_scored": DefenseSpec("poison_scored", ScoredPoisonParams, "as poison, the answers chosen by the "
                                 "antidistillation score: those whose training most lowers the proxy's holdout loss",
                                 main="rate", main_help="share of answers poisoned, in [0, 1] (default 0.1)",
                                 needs_proxy=True, needs_gradient=True, rewrites_text=True),
}
DEFENSE_KINDS: tuple[str, ...] = tuple(DEFENSES)
DefenseKind = Literal[DEFENSE_KINDS]  # type: ignore[valid-type]  # built from the table, so it cannot drift


def defense_spec(kind: str) -> DefenseSpec:
    try:
        return DEFENSES[kind]
    except KeyError:
        raise ValueError(f"unknown defense {kind!r}; expected one of {', '.join(DEFENSE_KINDS)}") from None


def check_defense(kind: str, params: dict[str, Any]) -> None:
    """Raise ValueError (one line naming the parameter) unless ``params`` are valid parameters of ``kind``. The
    dict itself is kept as given (labels and cache keys use it), only validated."""
    spec = defense_spec(kind)
    try:
        spec.params.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown = sorted(set(params) - set(spec.parameter_names()))
            raise ValueError(f"defense {kind!r} does not take {', '.join(unknown)}; its parameters are "
                             f"{', '.join(spec.parameter_names())}") from None
        detail = err.get("ctx", {}).get("error", err["msg"])
        raise ValueError(f"{kind} {name} {detail}") from None


def _redacted(value: Any) -> str:
    """A secret as a short digest: distinct keys keep distinct labels, the value is not shown."""
    return "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:8]


def public_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each secret (e.g. the watermark's key) replaced by its digest: what a label shows, and what
    an attacker who knows the defense knows (the scheme and its settings, not the key)."""
    secret = DEFENSES[kind].secrets if kind in DEFENSES else ()
    return {k: _redacted(v) if k in secret else v for k, v in params.items()}


def defense_label(kind: str, params: dict[str, Any]) -> str:
    """``kind(name=value, ...)``: a defense's label in the game's tables, the traces and the server's ledger."""
    inner = ", ".join(f"{k}={v}" for k, v in sorted(public_params(kind, params).items()))
    return f"{kind}({inner})" if inner else kind


__all__ = ["DEFENSES", "DEFENSE_KINDS", "DefenseKind", "DefenseParams", "DefenseSpec", "check_defense",
           "defense_label", "defense_spec", "public_params"]
