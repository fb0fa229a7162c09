"""Logits processors with the Hugging Face signature ``(input_ids, scores) -> scores``, and the chain protocol.

Temperature, top-k and top-p here are the truncation baselines; they validate their arguments with a
:class:`~distillarena.core.errors.UserError` and compute exactly what the Hugging Face warpers compute, so they can be
passed to ``model.generate(logits_processor=LogitsProcessorList([...]))`` as well as to :func:`sample`.

Chain protocol (what :func:`~distillarena.decoding.sample` does with ``processors``):

- before the first step it calls ``begin(input_ids, attention_mask, max_new_tokens)`` on every processor that has
  it (stateful processors such as a proxy model with its own KV cache use it to prefill with the true attention
  mask instead of guessing it from pad ids);
- at every step it calls the processors in order, each on the output of the previous one, on float32 scores;
- a processor with ``applies_temperature = True`` divides by its own temperature, so the sampler refuses a second
  temperature on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from distillarena.core.errors import UserError

Processor = Callable[[Tensor, Tensor], Tensor]


def check_temperature(temperature: float, *, allow_zero: bool = True) -> float:
    t = float(temperature)
    if not t == t or t < 0 or (t == 0 and not allow_zero) or t == float("inf"):
        need = ">= 0 (0 = greedy)" if allow_zero else "> 0"
        raise UserError(f"temperature must be {need} and finite, got {temperature}")
    return t


def check_top_p(top_p: float) -> float:
    p = float(top_p)
    if not (0.0 < p <= 1.0):
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    return p


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise UserError(f"top_k must be an integer >= 1, got {top_k}")
    return int(top_k)


class TemperatureProcessor(LogitsProcessor):
    """``scores / temperature`` (temperature > 0; for greedy decoding use the sampler's ``temperature=0``)."""

    def __init__(self, temperature: float):
        self.temperature = check_temperature(temperature, allow_zero=False)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores / self.temperature


class TopKProcessor(LogitsProcessor):
    """Keep the ``top_k`` highest scores (ties with the k-th kept), set the rest to ``-inf``; as HF's TopK warper."""

    def __init__(self, top_k: int, filter_value: float = -float("inf")):
        self.top_k = check_top_k(top_k)
        self.filter_value = filter_value

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, self.filter_value)


class TopPProcessor(LogitsProcessor):
    """Nucleus truncation: keep the smallest set of tokens whose probability reaches ``top_p`` (as HF's TopP warper:
    sort ascending, drop tokens whose cumulative probability is <= 1 - top_p, always keep the most likely one)."""

    def __init__(self, top_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        self.top_p = check_top_p(top_p)
        self.filter_value = filter_value
        self.min_tokens_to_keep = max(1, int(min_tokens_to_keep))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.top_p >= 1.0:
            return scores
        sorted_logits, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)
        remove_sorted[..., -self.min_tokens_to_keep :] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        return scores.masked_fill(remove, self.filter_value)


def sampling_warpers(temperature: float, top_k: int | None, top_p: float | None) -> list[Processor]:
    """The processors that temperature / top-k / top-p add after the user's chain, in Hugging Face's order."""
    out: list[Processor] = []
    t = check_temperature(temperature)
    if t not in (0.0, 1.0):
        out.append(TemperatureProcessor(t))
    if top_k is not None and top_k != 0:
        out.append(TopKProcessor(top_k))
    if top_p is not None and check_top_p(top_p) < 1.0:
        out.append(TopPProcessor(top_p))
    return out


def begin_processors(
    processors: Sequence[Processor], input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int
) -> None:
    """Call ``begin`` on the stateful processors of a chain (see the module docstring)."""
    for p in processors:
        begin = getattr(p, "begin", None)
        if callable(begin):
            begin(input_ids, attention_mask, max_new_tokens)


def apply_processors(processors: Sequence[Processor], input_ids: Tensor, scores: Tensor) -> Tensor:
    for p in processors:
        scores = p(input_ids, scores)
    return scores


def sample_from_probs(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs`` ``[B, V]`` by inverse-CDF sampling: one uniform draw per row.

    Same distribution as ``torch.multinomial(probs, 1)``, about 10x cheaper on CPU (multinomial draws one
    exponential per vocabulary entry). The cumulative sum is in float64 and the draw is scaled by the row's total,
    so a zero-probability token is never chosen. Consumes exactly ``B`` float64 uniforms from ``generator``.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).view(-1)
    v = probs.shape[-1]
    over = idx >= v  # u * total rounded up to total (probability ~2**-53): take the last token with mass
    if bool(over.any()):
        last = v - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
        idx = torch.where(over, last, idx)
    return idx


__all__ = [
    "Processor",
    "TemperatureProcessor",
    "TopKProcessor",
    "TopPProcessor",
    "apply_processors",
    "begin_processors",
    "check_temperature",
    "check_top_k",
    "check_top_p",
    "sample_from_probs",
    "sampling_warpers",
]
