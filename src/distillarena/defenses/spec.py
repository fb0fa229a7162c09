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
==================  =========================================================================================

Every kind also takes ``top_p`` (nucleus truncation of what it samples), so a defense can be played at the
teacher's own decoding.

Adding a defense: a parameters model and one :class:`DefenseSpec` entry here, and its processor in
``build_policy`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class DefenseSpec:
    """One defense kind.

    params:         its parameters (unknown names and bad values are refused when a config loads);
    main:           the parameter that ``strength`` is shorthand for (server keys, ``keys create --strength``);
    needs_proxy:    it runs a proxy student in lockstep with the teacher (PoE, antidistillation);
    needs_gradient: it needs the proxy's holdout-loss gradient (antidistillation);
    """

    kind: str
    params: type[DefenseParams]
    summary: str
    main: str | None = None
    main_help: str = ""
    needs_proxy: bool = False
    needs_gradient: bool = False

    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.params.model_fields)

    def proxy_forwards_per_token(self, params: dict[str, Any]) -> int:
        """Proxy forward passes per generated token: PoE one; antidistillation two (finite differences: the two
        perturbed copies) or one forward-mode pass (``method: jvp``); the rest none."""
        if not self.needs_proxy:
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


def defense_label(kind: str, params: dict[str, Any]) -> str:
    """``kind(name=value, ...)``: a defense's label in the game's tables, the traces and the server's ledger."""
    inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{kind}({inner})" if inner else kind


__all__ = ["DEFENSES", "DEFENSE_KINDS", "DefenseKind", "DefenseParams", "DefenseSpec", "check_defense",
           "defense_label", "defense_spec"]
