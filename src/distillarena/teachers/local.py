"""A teacher model held in memory: eval mode, no gradient, its own dtype and device.

Its signal is *fused*: the final hidden states and the output layer (:class:`LMHeadInput`), from which the
objectives compute logits chunk by chunk, so no ``[batch, length, vocab]`` float32 tensor is ever built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distillarena.objectives import LMHeadInput, TeacherSignal


def final_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Final hidden states ``[B, T, H]`` (after the final norm) of a Hugging Face causal LM, computing the logits
    of one position only (``logits_to_keep=1``) where the model supports it."""
    kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True,
                          "use_cache": False}
    try:
        out = model(**kw, logits_to_keep=1)
    except TypeError:
        out = model(**kw)
    return out.hidden_states[-1]


def _base_config(model: torch.nn.Module):
    m = model
    for attr in ("module", "base_model", "model"):  # DDP, peft
        if getattr(m, "config", None) is not None:
            break
        m = getattr(m, attr, m)
    return getattr(m, "config", None)


def output_head(model: torch.nn.Module, hidden: Tensor, *, device: torch.device | None = None,
                weight: Tensor | None = None) -> LMHeadInput:
    """``hidden`` with the model's output layer (weight, bias, logit scale, final soft-capping) as an LMHeadInput.
    ``weight`` overrides the layer's weight (e.g. a copy already moved to ``device``)."""
    head = model.get_output_embeddings()
    w = head.weight if weight is None else weight
    b = getattr(head, "bias", None)
    cfg = _base_config(model)
    scale = getattr(cfg, "logit_scale", None) or 1.0
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if device is not None:
        hidden = hidden.to(device)
        w = w.to(device)
        b = b.to(device) if b is not None else None
    return LMHeadInput(hidden, w, b, logit_scale=float(scale), softcap=softcap)


class LocalTeacher:
    """A teacher model in memory. ``signal(batch)`` gives the dense (fused) signal at the batch's shifted
    positions (position ``t`` predicts token ``t + 1``)."""

    kind = "model"

    def __init__(self, model: torch.nn.Module, tokenizer, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, name: str = ""):
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self._weights: dict[str, Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _weight_on(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._weights:
            self._weights[key] = self.model.get_output_embeddings().weight.detach().to(device)
        return self._weights[key]

    @torch.no_grad()
    def head(self, input_ids: Tensor, attention_mask: Tensor | None, device: torch.device | None = None
             ) -> LMHeadInput:
        """The teacher's hidden states at every position ``[B, T, H]`` with its output layer, on ``device``."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        h = final_hidden(self.model, ids, mask)
        device = device or input_ids.device
        return output_head(self.model, h, device=device, weight=self._weight_on(device))

    def signal(self, batch: dict[str, Any], device: torch.device | None = None) -> TeacherSignal:
        head = self.head(batch["input_ids"], batch.get("attention_mask"), device)
        return TeacherSignal.dense(LMHeadInput(head.hidden[:, :-1], head.weight, head.bias, head.logit_scale,
                                               head.softcap))

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Full logits ``[B, T, V]`` in float32 (evaluation on small batches only)."""
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


class TextTeacher:
    """A teacher known only by its text: the data's completions. It gives no signal; objectives that need one
    are refused before training starts."""

    kind = "text"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def signal(self, batch: dict[str, Any], device: torch.device | None = None) -> None:
        return None
