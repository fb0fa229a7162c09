"""Information throttling: the reasoning withheld, cut, or replaced by a short summary; the final answer kept.

- :class:`AnswerOnly` (``answer_only``): the answer line alone (nothing when the teacher gave no answer line);
- :class:`TruncateReasoning` (``truncate_reasoning``, ``steps``): the first ``steps`` reasoning lines, then the
  answer line;
- :class:`Summary` (``summary``, ``lines``): the reasoning replaced by an *extractive* summary that a smaller model
  (the proxy) writes by choosing the ``lines`` reasoning lines it finds least predictable (highest total surprisal
  given the prompt and the lines before), kept in their order, then the answer line. A summary never adds a line,
  so it is no longer than the reasoning, and it is shorter whenever the reasoning has more than ``lines`` lines.
  (The built-in world's proxy writes arithmetic steps, not prose: choosing which of the teacher's steps to show is
  the summary it can write. A chat model as the proxy could write an abstractive one; that is not built.)

Each keeps the teacher's answer line verbatim, so final-answer accuracy is unchanged by construction.
"""

from __future__ import annotations

import torch

from distillarena.core.errors import UserError
from distillarena.defenses.rewrite import Rewritten, join_reasoning, piece_logprobs, split_reasoning


class AnswerOnly:
    def __init__(self, task):
        self.task = task

    def __call__(self, prompts: list[str], completions: list[str], *, seed: int = 0) -> list[Rewritten]:
        out = []
        for text in completions:
            reasoning, answer = split_reasoning(text, self.task)
            out.append(Rewritten(answer or "", {"withheld_lines": len(reasoning)}))
        return out


class TruncateReasoning:
    def __init__(self, task, steps: int):
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise UserError(f"truncate_reasoning steps must be an integer >= 0, got {steps}")
        self.task, self.steps = task, int(steps)

    def __call__(self, prompts: list[str], completions: list[str], *, seed: int = 0) -> list[Rewritten]:
        out = []
        for text in completions:
            reasoning, answer = split_reasoning(text, self.task)
            kept = reasoning[: self.steps]
            out.append(Rewritten(join_reasoning(kept, answer), {"withheld_lines": len(reasoning) - len(kept)}))
        return out


class Summary:
    def __init__(self, task, proxy: torch.nn.Module, proxy_tokenizer, lines: int = 1):
        if isinstance(lines, bool) or int(lines) != lines or lines < 1:
            raise UserError(f"summary lines must be an integer >= 1, got {lines}")
        if proxy is None or proxy_tokenizer is None:
            raise UserError("defense 'summary' needs a proxy model and its tokenizer (set proxy in the config)")
        self.task, self.proxy, self.tok, self.lines = task, proxy.eval(), proxy_tokenizer, int(lines)

    def surprisals(self, prompts: list[str], reasonings: list[list[str]]) -> list[list[float]]:
        """Per row, each reasoning line's total surprisal (nats) under the proxy, its newline included."""
        lps = piece_logprobs(self.proxy, self.tok, prompts, [[ln + "\n" for ln in r] for r in reasonings])
        return [[-float(t.sum()) for t in row] for row in lps]

    def __call__(self, prompts: list[str], completions: list[str], *, seed: int = 0) -> list[Rewritten]:
        split = [split_reasoning(t, self.task) for t in completions]
        todo = [i for i, (r, _) in enumerate(split) if len(r) > self.lines]
        chosen: dict[int, list[int]] = {}
        if todo:
            scores = self.surprisals([prompts[i] for i in todo], [split[i][0] for i in todo])
            for i, s in zip(todo, scores, strict=True):
                order = sorted(range(len(s)), key=lambda j: (-s[j], j))  # ties: the earlier line
                chosen[i] = sorted(order[: self.lines])
        out = []
        for i, (reasoning, answer) in enumerate(split):
            keep = chosen.get(i, list(range(len(reasoning))))
            out.append(Rewritten(join_reasoning([reasoning[j] for j in keep], answer),
                                 {"withheld_lines": len(reasoning) - len(keep)}))
        return out


__all__ = ["AnswerOnly", "Summary", "TruncateReasoning"]
