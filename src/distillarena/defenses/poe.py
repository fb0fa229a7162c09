"""Product-of-Experts decoding: mix the teacher's logits with a proxy student's, ``(1 - gamma) z_T + gamma z_P``.

As in the Distillation Game reference code (``ProductOfExpertsLogitsProcessor``): raw logits, per step, on the same
token ids; the proxy is an untouched small model of the same tokenizer, run in lockstep with its own KV cache (one
proxy forward per generated token, no gradient). After the sampler's temperature ``tau`` this samples
``pi ~ pi_T^((1-gamma)/tau) * pi_P^(gamma/tau)``: tokens the teacher likes but the proxy student does not (the most
"teachable" ones) are suppressed. ``gamma = 0`` turns the processor off (the proxy is not even run).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor

from distillarena.core.errors import UserError
from distillarena.decoding.decoders import model_vocab_size
from distillarena.defenses.proxy import LockstepProxy, check_same_vocabulary


def check_gamma(gamma: float) -> float:
    g = float(gamma)
    if not (0.0 <= g <= 1.0):
        raise UserError(f"PoE gamma must be in [0, 1], got {gamma}")
    return g


def product_of_experts(teacher_logits: Tensor, proxy_logits: Tensor, gamma: float) -> Tensor:
    """``(1 - gamma) * teacher_logits + gamma * proxy_logits`` (exactly ``teacher_logits`` when ``gamma == 0``)."""
    gamma = check_gamma(gamma)
    if gamma == 0.0:
        return teacher_logits
    if proxy_logits.shape != teacher_logits.shape:
        raise UserError(
            f"proxy logits have shape {tuple(proxy_logits.shape)} but the teacher's have "
            f"{tuple(teacher_logits.shape)}: proxy and teacher must share the vocabulary"
        )
    return (1.0 - gamma) * teacher_logits + gamma * proxy_logits.to(teacher_logits.dtype)


class ProductOfExpertsProcessor(LogitsProcessor):
    """Logits processor for Product-of-Experts decoding with a proxy student (works in ``sample`` and
    ``model.generate``; see :mod:`distillarena.defenses.proxy` for how the proxy follows the batch).

    ``teacher`` (a model, or its vocabulary size as an int) and the two tokenizers, when given, are checked against
    the proxy up front; the logit widths are checked again at every call. ``pad_token_id`` lets the processor
    infer the prompt mask of left-padded batches inside ``generate``. ``fast`` chooses the proxy's decoder.
    """

    def __init__(self, proxy: torch.nn.Module, gamma: float, *, teacher: torch.nn.Module | int | None = None,
                 teacher_tokenizer=None, proxy_tokenizer=None, pad_token_id: int | None = None,
                 fast: bool | None = None):
        self.gamma = check_gamma(gamma)
        teacher_vocab = teacher if isinstance(teacher, int) or teacher is None else model_vocab_size(teacher)
        self.vocab_size = check_same_vocabulary(teacher_vocab, proxy, teacher_tokenizer=teacher_tokenizer,
                                                proxy_tokenizer=proxy_tokenizer)
        self.proxy = LockstepProxy(proxy, pad_token_id=pad_token_id, fast=fast)

    def begin(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 64) -> None:
        if self.gamma > 0:
            self.proxy.begin(input_ids, attention_mask, max_new_tokens)

    def reset(self) -> None:
        self.proxy.reset()

    @property
    def proxy_forwards(self) -> int:
        return self.proxy.forwards

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.gamma == 0.0:
            return scores
        if scores.shape[-1] != self.vocab_size:
            raise UserError(f"the teacher's scores have {scores.shape[-1]} entries but the proxy has "
                            f"{self.vocab_size} logits: proxy and teacher must share the vocabulary")
        return product_of_experts(scores, self.proxy(input_ids), self.gamma)


__all__ = ["ProductOfExpertsProcessor", "check_gamma", "product_of_experts"]
