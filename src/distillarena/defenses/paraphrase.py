"""Paraphrasing: the teacher's reasoning rewritten by another model (the proxy, or any local causal LM), the final
answer kept.

:func:`paraphrase` is the public entry (the ``paraphrase`` defense, and any attacker that launders text through its
own model, e.g. to strip a watermark, call it). At ``strength`` ``s`` each reasoning line is chosen for rewriting
with probability ``s`` (independently, seeded); the lines are then rewritten in order, each chosen line replaced by
the line the rewriting model writes itself after the prompt and the lines before it as they now read (the
rewritten ones included), sampled at ``temperature`` up to the end of the line. The answer line is always the
teacher's. So ``s = 0`` is the teacher's text and ``s = 1`` is reasoning written wholly by the rewriter in front of
the teacher's answer; in between, the rewriter's lines condition on the teacher's and the reverse.

The rewriter keeps the structure: it writes exactly one line per chosen line, and a line it cannot write (empty, or
one that states the answer early) is left as the teacher's. What it writes is not checked: a weak rewriter's steps
may be wrong, or may no longer lead to the revealed answer; the game measures that as the cost to users (step
validity, checkable reasoning) and to the distiller.

The built-in world's models write arithmetic steps, not prose: a rewritten line is then another step the rewriter
finds likely in that place (the same step, another valid order or operand order, or a wrong one), which is what a
paraphrase of a chain of steps can change here.
"""

from __future__ import annotations

import math

import torch

from distillarena.core.errors import UserError
from distillarena.decoding import sample
from distillarena.defenses.rewrite import Rewritten, answer_marker, join_reasoning, split_reasoning
from distillarena.models.tokenizer import left_padding


def _check(strength: float, temperature: float, max_line_tokens: int) -> None:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise UserError(f"paraphrase strength must be a number in [0, 1], got {strength!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"paraphrase temperature must be >= 0 (0: greedy), got {temperature!r}")
    if int(max_line_tokens) != max_line_tokens or max_line_tokens < 1:
        raise UserError(f"paraphrase max_line_tokens must be an integer >= 1, got {max_line_tokens!r}")


@torch.no_grad()
def paraphrase_lines(prompts: list[str], completions: list[str], model: torch.nn.Module, tokenizer, *,
                     strength: float, seed: int, task, temperature: float = 1.0, max_line_tokens: int = 32,
                     batch_size: int = 64) -> list[tuple[str, int]]:
    """As :func:`paraphrase`, with the number of reasoning lines the rewriter replaced in each text."""
    _check(strength, temperature, max_line_tokens)
    if len(prompts) != len(completions):
        raise UserError(f"paraphrase: {len(prompts)} prompts for {len(completions)} completions")
    marker = answer_marker(task)
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    split = [split_reasoning(t, task) for t in completions]
    chosen = [(torch.rand(len(r), generator=gen) < strength).tolist() if r else [] for r, _ in split]
    lines = [list(r) for r, _ in split]
    replaced = [0] * len(lines)
    depth = max((len(r) for r in lines), default=0)
    was_training = model.training
    model.eval()
    try:
        for i in range(depth):  # line by line: a rewritten line conditions on the lines before it as they now read
            rows = [r for r in range(len(lines)) if i < len(lines[r]) and chosen[r][i]]
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                contexts = [prompts[r] + "".join(ln + "\n" for ln in lines[r][:i]) for r in part]
                with left_padding(tokenizer):
                    enc = tokenizer(contexts, return_tensors="pt", padding=True)
                res = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=int(max_line_tokens),
                             temperature=float(temperature), stop_strings=("\n",), tokenizer=tokenizer,
                             generator=gen, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
                for r, text in zip(part, res.texts(tokenizer), strict=True):
                    line = text.split("\n")[0].strip()
                    if line and marker not in line:  # else the teacher's line stays
                        lines[r][i] = line
                        replaced[r] += 1
    finally:
        model.train(was_training)
    return [(join_reasoning(ls, answer), k) for ls, (_, answer), k in zip(lines, split, replaced, strict=True)]


def paraphrase(prompts: list[str], completions: list[str], model: torch.nn.Module, tokenizer, *, strength: float,
               seed: int, task, temperature: float = 1.0, max_line_tokens: int = 32,
               batch_size: int = 64) -> list[str]:
    """``completions`` (answers to ``prompts``) with their reasoning rewritten by ``model`` at ``strength``: each
    reasoning line replaced with probability ``strength`` by the line ``model`` writes in its place; the answer line
    kept verbatim. Deterministic given ``seed``. ``task`` (a :class:`distillarena.tasks.base.Task`) says what the
    answer line is (its ``answer_prefix``); ``tokenizer`` is ``model``'s."""
    return [t for t, _ in paraphrase_lines(prompts, completions, model, tokenizer, strength=strength, seed=seed,
                                           task=task, temperature=temperature, max_line_tokens=max_line_tokens,
                                           batch_size=batch_size)]


class Paraphrase:
    """The ``paraphrase`` defense: :func:`paraphrase` with the proxy as the rewriter."""

    def __init__(self, task, proxy: torch.nn.Module, proxy_tokenizer, strength: float = 0.5,
                 temperature: float = 1.0):
        if proxy is None or proxy_tokenizer is None:
            raise UserError("defense 'paraphrase' needs a proxy model and its tokenizer (set proxy in the config)")
        _check(strength, temperature, 1)
        self.task, self.proxy, self.tok = task, proxy, proxy_tokenizer
        self.strength, self.temperature = float(strength), float(temperature)

    def __call__(self, prompts: list[str], completions: list[str], *, seed: int = 0) -> list[Rewritten]:
        done = paraphrase_lines(prompts, completions, self.proxy, self.tok, strength=self.strength, seed=seed,
                                task=self.task, temperature=self.temperature)
        return [Rewritten(text, {"rewritten_lines": k, "changed": text != join_reasoning(*split_reasoning(orig,
                                                                                                       self.task))})
                for (text, k), orig in zip(done, completions, strict=True)]


__all__ = ["Paraphrase", "paraphrase", "paraphrase_lines"]
