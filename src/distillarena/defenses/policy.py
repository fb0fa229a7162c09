"""A decoding policy: one named defense at one strength, ready to sample with.

Every job that decodes a defended teacher (``distillarena traces``, teacher utility, the game, the server)
builds its defense here from a kind and parameters, so a defense means the same thing everywhere:

==================  =========================================================================================
kind                what is sampled (``z`` = teacher logits)
==================  =========================================================================================
``none``            softmax(z / temperature) (temperature 1 by default: the undefended teacher)
``temperature``     softmax(z / temperature)
``truncation``      top-k and/or top-p truncation of softmax(z / temperature)
``poe``             softmax(((1 - gamma) z + gamma z_proxy) / temperature)
``antidistillation`` softmax(z / temperature + lam * b), b from the proxy's cached holdout gradient
==================  =========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding import SampleResult, sample
from ..errors import UserError
from .antidistillation import AntidistillationProcessor
from .poe import ProductOfExpertsProcessor

DEFENSE_KINDS = ("none", "temperature", "truncation", "poe", "antidistillation")
_ALLOWED = {
    "none": {"temperature"},
    "temperature": {"temperature"},
    "truncation": {"temperature", "top_k", "top_p"},
    "poe": {"temperature", "gamma"},
    "antidistillation": {"temperature", "lam", "method", "eps", "normalize"},
}


@dataclass
class DecodingPolicy:
    kind: str
    params: dict[str, Any]
    processors: list = field(default_factory=list)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def label(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind}({inner})" if inner else self.kind

    def sample(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               **kwargs: Any) -> SampleResult:
        for p in self.processors:
            if hasattr(p, "reset"):
                p.reset()
        return sample(model, input_ids, attention_mask, processors=self.processors, temperature=self.temperature,
                      top_k=self.top_k, top_p=self.top_p, **kwargs)


def build_policy(kind: str, params: dict[str, Any] | None = None, *, teacher: torch.nn.Module | None = None,
                 tokenizer=None, proxy: torch.nn.Module | None = None, proxy_tokenizer=None,
                 gradient=None) -> DecodingPolicy:
    """The policy for ``kind`` with ``params``; PoE and antidistillation need ``proxy`` (and a ``gradient``:
    a :class:`ProxyGradient` or the path of one saved by ``distillarena proxy-gradient``)."""
    params = dict(params or {})
    if kind not in DEFENSE_KINDS:
        raise UserError(f"unknown defense {kind!r}; expected one of {', '.join(DEFENSE_KINDS)}")
    unknown = set(params) - _ALLOWED[kind]
    if unknown:
        raise UserError(f"defense {kind!r} does not take {', '.join(sorted(unknown))}; "
                        f"its parameters are {', '.join(sorted(_ALLOWED[kind]))}")
    temperature = float(params.get("temperature", 1.0))
    pad = getattr(tokenizer, "pad_token_id", None)
    if kind in ("poe", "antidistillation") and proxy is None:
        raise UserError(f"defense {kind!r} needs a proxy model (set proxy in the config)")
    if kind == "poe":
        proc = ProductOfExpertsProcessor(proxy, params.get("gamma", 0.5), teacher=teacher,
                                         teacher_tokenizer=tokenizer, proxy_tokenizer=proxy_tokenizer,
                                         pad_token_id=pad)
        return DecodingPolicy(kind, params, [proc], temperature=temperature)
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
        # the processor divides by its own temperature; the sampler's stays at 1
        return DecodingPolicy(kind, params, [proc], temperature=1.0)
    return DecodingPolicy(kind, params, [], temperature=temperature, top_k=params.get("top_k"),
                          top_p=params.get("top_p"))
