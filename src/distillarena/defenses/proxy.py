"""A proxy student run in lockstep with the teacher, with its own KV cache; checks that proxy and teacher agree.

:class:`LockstepProxy` is what the stateful defenses (Product-of-Experts, antidistillation sampling) share. It is
called with the same growing ``input_ids`` as a logits processor and returns the proxy's next-token logits for
them, feeding the proxy one token per step:

- in :func:`distillarena.decoding.sample` the sampler calls ``begin(input_ids, attention_mask, max_new_tokens)``
  first, so the proxy prefills with the *true* attention mask;
- in ``model.generate`` there is no such hook: a call whose ``input_ids`` are not the previous ones plus one token
  starts a new batch, and the prompt mask is then inferred from ``pad_token_id`` as the run of *leading* pad
  tokens of each row (left padding; a prompt must not start with the pad token). Without ``pad_token_id`` the
  prompts are taken as unpadded. Calling ``begin(input_ids, attention_mask)`` before ``generate`` avoids the
  inference altogether. ``reset()`` drops the state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.decoding.decoders import make_decoder, model_vocab_size
from distillarena.models.fingerprint import tokenizer_fingerprint


def leading_pad_mask(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """Attention mask of a left-padded batch: 0 on each row's leading run of ``pad_token_id``, 1 after it."""
    if pad_token_id is None:
        return torch.ones_like(input_ids)
    return ((input_ids != pad_token_id).long().cumsum(-1) > 0).long()


class LockstepProxy:
    """Next-token logits of ``model`` on the sequences a logits processor sees, one proxy forward per step.

    With ``tangents`` (see :class:`~distillarena.decoding.HFDecoder`) it returns ``(logits, d logits)``.
    ``forwards`` counts the proxy forward passes (prefills and steps) since construction.
    """

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int | None = None, fast: bool | None = None,
                 tangents: dict[str, Tensor] | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self._fast = fast
        self._tangents = tangents
        self.forwards = 0
        self.reset()

    def reset(self) -> None:
        self._decoder = None
        self._ids: Tensor | None = None
        self._out = None

    def begin(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 64) -> None:
        """Start a batch: prefill the proxy on the prompts with their attention mask."""
        if attention_mask is None:
            attention_mask = leading_pad_mask(input_ids, self.pad_token_id)
        self._decoder = make_decoder(self.model, fast=self._fast, tangents=self._tangents)
        self._out = self._decoder.prefill(input_ids, attention_mask, max_new_tokens)
        self._ids = input_ids
        self.forwards += 1

    def __call__(self, input_ids: Tensor):
        prev = self._ids
        if prev is not None and input_ids.shape[0] == prev.shape[0]:
            n = prev.shape[1]
            if input_ids.shape[1] == n and torch.equal(input_ids, prev):
                return self._out
            if input_ids.shape[1] == n + 1 and torch.equal(input_ids[:, :n], prev):
                self._out = self._decoder.step(input_ids[:, -1])
                self._ids = input_ids
                self.forwards += 1
                return self._out
        self.begin(input_ids, None)  # a new batch (e.g. the first call inside model.generate)
        return self._out


# ---------------------------------------------------------------------------------------------------------------
def check_same_vocabulary(teacher_vocab_size: int | None, proxy: torch.nn.Module, *, teacher_tokenizer=None,
                          proxy_tokenizer=None, what: str = "proxy") -> int:
    """Raise a UserError unless the proxy's logits and tokenizer match the teacher's; return the proxy vocab size."""
    proxy_vocab = model_vocab_size(proxy)
    if teacher_vocab_size is not None and proxy_vocab != teacher_vocab_size:
        raise UserError(
            f"the {what} has a vocabulary of {proxy_vocab} logits but the teacher has {teacher_vocab_size}: "
            "proxy and teacher must share the tokenizer and the vocabulary size"
        )
    if (teacher_tokenizer is None) != (proxy_tokenizer is None):
        raise UserError(f"give both the teacher's and the {what}'s tokenizer to check them, or neither")
    if teacher_tokenizer is not None and tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(
        proxy_tokenizer
    ):
        raise UserError(f"the {what}'s tokenizer differs from the teacher's (different vocabulary or special tokens)")
    return proxy_vocab


__all__ = [
    "LockstepProxy",
    "check_same_vocabulary",
    "leading_pad_mask",
]
