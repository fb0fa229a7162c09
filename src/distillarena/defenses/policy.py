"""A decoding policy: one named defense at one strength, ready to sample with.

Every job that decodes a defended teacher (``distillarena traces``, teacher utility, the game, the server)
builds its defense here from a kind and parameters, so a defense means the same thing everywhere. The kinds, their
parameters and what each samples are the table in :mod:`distillarena.defenses.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.decoding import SampleResult, sample
from distillarena.defenses.antidistillation import AntidistillationProcessor
from distillarena.defenses.poe import ProductOfExpertsProcessor
from distillarena.defenses.rewrite import TextRewrite
from distillarena.defenses.spec import check_defense, defense_label, defense_spec


@dataclass
class DecodingPolicy:
    kind: str
    params: dict[str, Any]
    processors: list = field(default_factory=list)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rewrite: TextRewrite | None = None  # an output-level defense: the decoded text is rewritten (defenses.rewrite)

    @property
    def label(self) -> str:
        return defense_label(self.kind, self.params)

    @property
    def rewrites_text(self) -> bool:
        return self.rewrite is not None

    def sample(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               **kwargs: Any) -> SampleResult:
        for p in self.processors:
            if hasattr(p, "reset"):
                p.reset()
        return sample(model, input_ids, attention_mask, processors=self.processors, temperature=self.temperature,
                      top_k=self.top_k, top_p=self.top_p, **kwargs)


def build_policy(kind: str, params: dict[str, Any] | None = None, *, teacher: torch.nn.Module | None = None,
                 tokenizer=None, proxy: torch.nn.Module | None = None, proxy_tokenizer=None,
                 gradient=None, task=None) -> DecodingPolicy:
    """The policy for ``kind`` with ``params``; PoE and antidistillation need ``proxy`` (and a ``gradient``:
    a :class:`ProxyGradient` or the path of one saved by ``distillarena proxy-gradient``). An output-level kind
    (``rewrites_text``) samples at its temperature / top-p and carries its ``rewrite`` of the decoded text; it needs
    the ``task`` (what a reasoning line and the answer line are), and summary / paraphrase / poison_scored the proxy
    (poison_scored its gradient too)."""
    params = dict(params or {})
    try:
        spec = defense_spec(kind)
        check_defense(kind, params)
    except ValueError as e:
        raise UserError(str(e)) from None
    temperature = float(params.get("temperature", 1.0))
    pad = getattr(tokenizer, "pad_token_id", None)
    if spec.needs_proxy and proxy is None:
        raise UserError(f"defense {kind!r} needs a proxy model (set proxy in the config)")
    if spec.rewrites_text:
        return DecodingPolicy(kind, params, [], temperature=temperature, top_p=params.get("top_p"),
                              rewrite=_rewrite(kind, params, task, proxy, proxy_tokenizer, gradient))
    if kind == "poe":
        proc = ProductOfExpertsProcessor(proxy, params.get("gamma", 0.5), teacher=teacher,
                                         teacher_tokenizer=tokenizer, proxy_tokenizer=proxy_tokenizer,
                                         pad_token_id=pad)
        return DecodingPolicy(kind, params, [proc], temperature=temperature, top_p=params.get("top_p"))
    if kind == "watermark":
        from distillarena.defenses.watermark import WatermarkProcessor

        p = spec.params.model_validate(params)  # the defaults filled in
        proc = WatermarkProcessor(p.key, p.delta, p.gamma, p.context)
        return DecodingPolicy(kind, params, [proc], temperature=temperature, top_p=params.get("top_p"))
    if kind == "antidistillation":
        if gradient is None:
            raise UserError("defense 'antidistillation' needs the proxy's holdout gradient "
                            "(run `distillarena proxy-gradient` first and set gradient in the config)")
        proc = AntidistillationProcessor(
            proxy, gradient, params.get("lam", 0.0), temperature=temperature,
            method=params.get("method", "fd"), eps=params.get("eps", 1e-2),
            normalize=params.get("normalize", "unit"), teacher=teacher, teacher_tokenizer=tokenizer,
            proxy_tokenizer=proxy_tokenizer, pad_token_id=pad,
        )
        # the processor divides by its own temperature; the sampler's stays at 1 (top-p then cuts its output)
        return DecodingPolicy(kind, params, [proc], temperature=1.0, top_p=params.get("top_p"))
    return DecodingPolicy(kind, params, [], temperature=temperature, top_k=params.get("top_k"),
                          top_p=params.get("top_p"))


def _rewrite(kind: str, params: dict[str, Any], task, proxy, proxy_tokenizer, gradient) -> TextRewrite:
    """The text rewrite of an output-level defense (the modules' docstrings say what each does)."""
    if task is None:
        raise UserError(f"defense {kind!r} rewrites the teacher's text: it needs the task (its answer line)")
    if kind == "answer_only":
        from distillarena.defenses.throttle import AnswerOnly

        return AnswerOnly(task)
    if kind == "truncate_reasoning":
        from distillarena.defenses.throttle import TruncateReasoning

        return TruncateReasoning(task, int(params.get("steps", 1)))
    if kind == "summary":
        from distillarena.defenses.throttle import Summary

        return Summary(task, proxy, proxy_tokenizer, int(params.get("lines", 1)))
    if kind == "paraphrase":
        from distillarena.defenses.paraphrase import Paraphrase

        return Paraphrase(task, proxy, proxy_tokenizer, float(params.get("strength", 0.5)),
                          float(params.get("rewriter_temperature", 1.0)))
    if kind in ("poison", "poison_scored"):
        from distillarena.defenses.poison import Poison

        scored = kind == "poison_scored"
        if scored and gradient is None:
            raise UserError("defense 'poison_scored' needs the proxy's holdout gradient (run `distillarena "
                            "proxy-gradient` first and set gradient in the config)")
        return Poison(task, float(params.get("rate", 0.1)), str(params.get("mode", "step")),
                      select="score" if scored else "random", proxy=proxy, proxy_tokenizer=proxy_tokenizer,
                      gradient=gradient, eps=float(params.get("eps", 1e-2)))
    raise UserError(f"defense {kind!r} is marked as rewriting text but build_policy has no rewrite for it")
