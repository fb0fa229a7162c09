"""What the output-level defenses share: a completion split into its reasoning and its final answer line, and the
result of a rewrite.

An output-level defense (``rewrites_text`` in :mod:`distillarena.defenses.spec`) takes the teacher's decoded
completions of a batch and returns what the API reveals instead (:class:`Rewritten`: the text, and marks such as
``poisoned``). Its ``__call__(prompts, completions, *, seed)`` is deterministic given ``seed`` (the batch's seed),
so a resumed trace collection and a served teacher write the same text. The rewrites are
:mod:`~distillarena.defenses.throttle` (answer only, truncated reasoning, summary),
:mod:`~distillarena.defenses.paraphrase` and :mod:`~distillarena.defenses.poison`; they are built by
:func:`distillarena.defenses.policy.build_policy` like every defense.

A completion's *reasoning* is its non-empty lines before the first line holding the task's answer prefix (without
its trailing space: ``Answer:``); that line is its *answer line*; whatever follows it is dropped (a teacher stops
there). A completion without an answer line is all reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Rewritten:
    """One revealed completion: the rewritten ``text`` and per-trace ``marks`` (e.g. ``{"poisoned": True}``)."""

    text: str
    marks: dict[str, Any] = field(default_factory=dict)


class TextRewrite(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], *, seed: int) -> list[Rewritten]: ...


def answer_marker(task) -> str:
    """The text that marks a task's answer line (``Answer:`` for ``Answer: ``)."""
    return task.answer_prefix.strip() or task.answer_prefix


def split_reasoning(text: str, task) -> tuple[list[str], str | None]:
    """``(reasoning lines, answer line or None)`` of a completion (see the module docstring)."""
    marker = answer_marker(task)
    reasoning: list[str] = []
    for line in text.split("\n"):
        if marker in line:
            return reasoning, line.strip()
        if line.strip():
            reasoning.append(line.strip())
    return reasoning, None


def join_reasoning(reasoning: list[str], answer: str | None) -> str:
    """A completion from reasoning lines and an answer line (either may be empty)."""
    return "\n".join(list(reasoning) + ([answer] if answer is not None else []))


def fit_tokens(text: str, tokenizer, max_tokens: int, eos_token_id: int | None, *, ended: bool
               ) -> tuple[str, list[int], bool]:
    """What is revealed of a rewritten completion within ``max_tokens`` (a rewrite may lengthen the text, the
    request paid for ``max_tokens``): ``(text, token ids, stopped)``, the tokens those of the text as ``tokenizer``
    reads it, cut to ``max_tokens`` (the text then decoded from what is left), with the EOS appended when the
    teacher ``ended`` on it and there is room. In-process traces and the server reveal exactly this."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if len(ids) > max_tokens:
        ids = ids[:max_tokens]
        return tokenizer.decode(ids, skip_special_tokens=True), ids, False
    if ended and eos_token_id is not None and len(ids) < max_tokens:
        return text, ids + [eos_token_id], True
    return text, ids, ended


@torch.no_grad()
def piece_logprobs(model: torch.nn.Module, tokenizer, prompts: list[str], pieces: list[list[str]], *,
                   batch_size: int = 64) -> list[list[torch.Tensor]]:
    """The log-probs ``model`` gives each token of each piece of text, the pieces of a row read in order after its
    prompt: ``out[row][j]`` is a float tensor with one entry per token of ``pieces[row][j]`` (each piece encoded on
    its own, so its tokens are exactly its own). The prompt is encoded as training data encodes it."""
    rows = []
    for prompt, ps in zip(prompts, pieces, strict=True):
        ids = list(tokenizer(prompt)["input_ids"])
        spans = []
        for piece in ps:
            p_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []
            spans.append((len(ids), len(ids) + len(p_ids)))
            ids += p_ids
        rows.append((ids, spans))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[list[torch.Tensor]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):  # right padding: positions are those of the unpadded row
            x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, : len(ids)] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for r, (_, spans) in enumerate(chunk):
            out.append([lp[r, a - 1 : b - 1] for a, b in spans])  # token t is predicted at position t - 1
    return out


__all__ = ["Rewritten", "TextRewrite", "answer_marker", "fit_tokens", "join_reasoning", "piece_logprobs",
           "split_reasoning"]
