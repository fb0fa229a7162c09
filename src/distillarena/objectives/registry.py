"""The objective registry: a name -> chunk function table that :func:`compute_objective` dispatches on.

Adding an objective takes a few lines. The function receives one
:class:`~distillarena.objectives.engine.ObjectiveChunk` (a chunk of valid positions, student logits already
divided by the loss temperature) and returns the per-position loss ``[C]``; the engine differentiates it with
autograd, one chunk at a time, and does the chunking, the fused output layer, masking, vocabulary checks and
the reduction::

    from distillarena.objectives import register_objective

    @register_objective("fkl_plus_rkl", signals=("dense", "topk"))
    def fkl_plus_rkl(chunk, *, weight: float = 0.5):
        lq, lp = chunk.student_logprobs(), chunk.teacher_logprobs()
        return (lp.exp() * (lp - lq)).sum(-1) + weight * (lq.exp() * (lq - lp)).sum(-1)

Keyword-only parameters with defaults become the objective's parameters (``compute_objective(...,
weight=0.2)``); an unknown parameter is a :class:`~distillarena.core.errors.UserError`. A function may instead
return a :class:`~distillarena.objectives.engine.ChunkResult` with an analytic gradient
(``returns_grad=True``), which is how the built-ins avoid the cost of autograd on ``[C, V]`` tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from distillarena.core.errors import UserError
from distillarena.objectives.signals import SIGNAL_KINDS

__all__ = ["ObjectiveSpec", "register_objective", "available_objectives", "get_objective", "cross_vocab_objectives"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective.

    signals:      teacher signal kinds it accepts ("none" means it also runs with ``teacher=None``).
    needs_labels: the per-position loss reads the label token (one-hot estimators, hpd).
    returns_grad: the function returns a ChunkResult whose ``grad`` is d(sum of loss)/d(raw student logits).
    per_position: names of tensor parameters that are indexed like the labels (e.g. hpd's ``sampled_ids``);
                  the engine flattens them and hands each chunk its slice in ``chunk.extras``.
    validate:     optional check of the resolved parameters, called once before any work.
    uses_teacher: False when it learns the labels alone (sft): callers then need not fetch a teacher signal.
    adapts:       signal kinds it does not take directly but ``prepare_signal`` converts into one it takes
                  (hpd reads a top-k signal as the log-probs of the label and of one student sample).
    prepare_signal: ``(student, signal, labels, generator, params) -> signal``, for the kinds in ``adapts``; it may
                  pop per-call parameters it has consumed from ``params``.
    cross_vocab:  it compares distributions without reading the teacher's by the student's token ids (or reads
                  them through the signal's vocabulary map), so it also takes a teacher in another vocabulary: a
                  dense or top-k signal with ``cross`` (a teacher with another tokenizer) or of another size.
    """

    name: str
    fn: Callable[..., Any]
    signals: frozenset[str]
    needs_labels: bool = False
    returns_grad: bool = False
    per_position: tuple[str, ...] = ()
    validate: Callable[[dict[str, Any]], None] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    uses_teacher: bool = True
    adapts: frozenset[str] = frozenset()
    prepare_signal: Callable[..., Any] | None = None
    cross_vocab: bool = False

    @property
    def accepted_signals(self) -> frozenset[str]:
        """Signal kinds a caller may hand it: those it takes and those it adapts."""
        return self.signals | self.adapts

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the given parameters; unknown names are a UserError."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise UserError(
                f"objective {self.name!r} got unknown parameter(s) {', '.join(unknown)}; it accepts: {accepted}"
            )
        resolved = {**self.defaults, **params}
        if self.validate is not None:
            self.validate(resolved)
        return resolved


_REGISTRY: dict[str, ObjectiveSpec] = {}


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ValueError(f"objective function {fn.__name__} must take the chunk as its first positional argument")
    out: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise ValueError(f"objective function {fn.__name__}: parameter {p.name!r} must be keyword-only (after *)")
        out[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def register_objective(
    name: str,
    *,
    signals: Iterable[str] = ("dense",),
    needs_labels: bool = False,
    returns_grad: bool = False,
    per_position: Iterable[str] = (),
    validate: Callable[[dict[str, Any]], None] | None = None,
    uses_teacher: bool = True,
    adapts: Iterable[str] = (),
    prepare_signal: Callable[..., Any] | None = None,
    cross_vocab: bool = False,
    overwrite: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(chunk, *, param=default, ...)`` under ``name``. Returns ``fn`` unchanged."""
    sig_set = frozenset(signals)
    adapt_set = frozenset(adapts)
    bad = (sig_set | adapt_set) - set(SIGNAL_KINDS) - {"none"}
    if bad:
        raise ValueError(f"unknown signal kind(s) {sorted(bad)}; expected among {SIGNAL_KINDS + ('none',)}")
    if bool(adapt_set) != (prepare_signal is not None):
        raise ValueError("adapts and prepare_signal go together: the kinds to convert and the function converting them")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"objective {name!r} is already registered (pass overwrite=True to replace it)")
        defaults = _keyword_defaults(fn)
        pp = tuple(per_position)
        missing = [p for p in pp if p not in defaults]
        if missing:
            raise ValueError(f"per_position names {missing} are not keyword parameters of {fn.__name__}")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = ObjectiveSpec(
            name=name,
            fn=fn,
            signals=sig_set,
            needs_labels=needs_labels,
            returns_grad=returns_grad,
            per_position=pp,
            validate=validate,
            defaults=defaults,
            description=doc.split("\n", 1)[0],
            uses_teacher=uses_teacher,
            adapts=adapt_set,
            prepare_signal=prepare_signal,
            cross_vocab=cross_vocab,
        )
        return fn

    return deco


def cross_vocab_objectives() -> list[str]:
    """Registered objectives that take a teacher with another tokenizer (``cross_vocab``)."""
    return [name for name, spec in _REGISTRY.items() if spec.cross_vocab]


def available_objectives() -> dict[str, str]:
    """Registered objective names (in registration order) with their one-line descriptions."""
    return {name: spec.description for name, spec in _REGISTRY.items()}


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown objective {name!r}; available: {', '.join(_REGISTRY)} (register your own with "
            "distillarena.objectives.register_objective)"
        ) from None


def unregister_objective(name: str) -> None:
    """Remove an objective (mainly for tests that register temporary ones)."""
    _REGISTRY.pop(name, None)
