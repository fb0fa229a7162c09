"""Poisoning: a share of the answers given plausible but wrong reasoning or a wrong final answer.

- :class:`Poison` (``poison``): ``rate`` of each batch's answers, chosen at random;
- the same with ``select="score"`` (``poison_scored``): the answers chosen by the antidistillation score, those a
  distiller would learn most from: the trace's directional derivative of the proxy's log-likelihood along the unit
  holdout-loss gradient ``g`` (finite differences, ``eps``),
  ``s(x) = (log p_{theta + eps g}(x) - log p_{theta - eps g}(x)) / (2 eps)``; one SGD step on ``x`` changes the
  proxy's holdout loss by about ``lr * s(x)``, so the lowest scores are the most useful traces, and those are poisoned.

How many: ``rate * B`` of a batch of ``B``, rounded stochastically (seeded), so the expected share is ``rate``
exactly and a batch never deviates from it by one answer or more.

What a poisoned answer is (``mode``):

- ``step``: one reasoning step, chosen at random, gets a wrong result (off by 1 to 9, never negative), and the
  steps after it are recomputed from it (an operand equal to a changed result takes its new value), as is the final
  answer: a coherent chain with one arithmetic slip, whose final answer is wrong. An answer without steps gets a
  wrong final answer;
- ``answer``: the final answer alone is made wrong (off by 1 to 9, never negative), the steps left as they are.

``step`` needs to know the task's steps: it exists for the built-in arithmetic task (:data:`CORRUPT_STEPS`);
``answer`` needs only the answer prefix and an integer answer.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Callable

import torch

from distillarena.core.errors import UserError
from distillarena.defenses.rewrite import Rewritten, answer_marker, join_reasoning, piece_logprobs, split_reasoning
from distillarena.tasks.arithmetic import STEP_RE, apply_op

_INT = re.compile(r"-?\d+")


def _wrong(value: int, rng: random.Random) -> int:
    """A plausible wrong value: off by 1 to 9, and not negative when the value is not."""
    delta = rng.randint(1, 9)
    if value - delta >= 0 and rng.random() < 0.5 or value < 0:
        return value - delta
    return value + delta


def corrupt_answer(reasoning: list[str], answer: str | None, rng: random.Random, marker: str
                   ) -> tuple[list[str], str | None]:
    """The answer line's (first) integer after the marker made wrong; no answer line: unchanged."""
    return reasoning, _replace_stated(answer, marker, lambda stated: _wrong(stated, rng))


def _replace_stated(answer: str | None, marker: str, new_value: Callable[[int], int]) -> str | None:
    """``answer`` with its first integer after ``marker`` replaced by ``new_value(that integer)`` (unchanged when
    there is no answer line or no integer in it)."""
    if answer is None:
        return None
    head, sep, tail = answer.partition(marker)
    m = _INT.search(tail)
    if m is None:
        return answer
    return head + sep + tail[: m.start()] + str(new_value(int(m.group(0)))) + tail[m.end():]


def corrupt_arithmetic_step(reasoning: list[str], answer: str | None, rng: random.Random, marker: str
                            ) -> tuple[list[str], str | None]:
    """One step's result made wrong and carried forward to the answer (see the module docstring)."""
    steps = [i for i, ln in enumerate(reasoning) if STEP_RE.match(ln)]
    if not steps:
        return corrupt_answer(reasoning, answer, rng, marker)
    j = rng.choice(steps)
    a, op, b, c = STEP_RE.match(reasoning[j]).groups()
    old = int(c)
    new = _wrong(old, rng)
    changed = {old: new}
    out = list(reasoning)
    out[j] = f"{a}{op}{b}={new}"
    last = new
    for i in range(j + 1, len(out)):
        m = STEP_RE.match(out[i])
        if not m:
            continue
        x, op, y, _ = m.groups()
        x, y = int(x), int(y)
        if x in changed:  # the left operand first: each step uses one earlier result at most once here
            x = changed[x]
        elif y in changed:
            y = changed[y]
        value = apply_op(op, x, y)
        old_value = int(m.group(4))
        if value != old_value:
            changed[old_value] = value
        out[i] = f"{x}{op}{y}={value}"
        last = value
    final = int(STEP_RE.match(reasoning[steps[-1]]).group(4))

    def carried(stated: int) -> int:
        wrong = changed.get(stated, last if stated == final else None)
        return _wrong(stated, rng) if wrong is None or wrong == stated else wrong

    return out, _replace_stated(answer, marker, carried)


Corruption = Callable[[list[str], str | None, random.Random, str], tuple[list[str], str | None]]
CORRUPT_STEPS: dict[str, Corruption] = {"arithmetic": corrupt_arithmetic_step}


def poisoned_count(rate: float, n: int, rng: random.Random) -> int:
    """``rate * n`` rounded stochastically: ``floor`` or ``ceil``, the latter with probability the fraction."""
    exact = rate * n
    low = math.floor(exact)
    return min(n, low + (1 if rng.random() < exact - low else 0))


class Poison:
    def __init__(self, task, rate: float = 0.1, mode: str = "step", *, select: str = "random",
                 proxy: torch.nn.Module | None = None, proxy_tokenizer=None, gradient=None, eps: float = 1e-2):
        if isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:
            raise UserError(f"poison rate must be in [0, 1], got {rate!r}")
        if mode not in ("step", "answer"):
            raise UserError(f"poison mode must be 'step' or 'answer', got {mode!r}")
        if mode == "step" and task.name not in CORRUPT_STEPS:
            raise UserError(f"poison mode 'step' knows the steps of {', '.join(CORRUPT_STEPS)}, not of task "
                            f"{task.name!r}: use mode 'answer'")
        if select not in ("random", "score"):
            raise UserError(f"poison select must be 'random' or 'score', got {select!r}")
        self.task, self.rate, self.mode, self.select = task, float(rate), mode, select
        self.corrupt = CORRUPT_STEPS[task.name] if mode == "step" else corrupt_answer
        self._twins: list[torch.nn.Module] = []
        if select == "score":
            if proxy is None or proxy_tokenizer is None or gradient is None:
                raise UserError("poison chosen by the antidistillation score needs the proxy, its tokenizer and its "
                                "holdout gradient")
            if not (float(eps) > 0 and math.isfinite(float(eps))):
                raise UserError(f"poison eps must be > 0, got {eps}")
            from distillarena.defenses.antidistillation import ProxyGradient, load_proxy_gradient

            if not isinstance(gradient, ProxyGradient):
                gradient = load_proxy_gradient(gradient, proxy, tokenizer=proxy_tokenizer)
            direction = gradient.direction("unit")
            for sign in (1.0, -1.0):
                twin = copy.deepcopy(proxy).eval()
                with torch.no_grad():
                    for n, p in twin.named_parameters():
                        p.add_(direction[n].to(p.dtype).to(p.device), alpha=sign * float(eps))
                self._twins.append(twin)
            self.tok, self.eps = proxy_tokenizer, float(eps)

    def scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        """Each completion's antidistillation score ``s(x)`` (lower: training on it lowers the proxy's holdout loss
        more); its end of text included, as a distiller trains on it."""
        eos = self.tok.eos_token or ""
        plus, minus = (piece_logprobs(m, self.tok, prompts, [[c + eos] for c in completions]) for m in self._twins)
        return [float((p[0].sum() - q[0].sum()) / (2 * self.eps)) for p, q in zip(plus, minus, strict=True)]

    def __call__(self, prompts: list[str], completions: list[str], *, seed: int = 0) -> list[Rewritten]:
        rng = random.Random(f"poison:{seed}")
        k = poisoned_count(self.rate, len(completions), rng)
        if k == 0:
            chosen: set[int] = set()
        elif self.select == "random":
            chosen = set(rng.sample(range(len(completions)), k))
        else:
            s = self.scores(prompts, completions)
            chosen = set(sorted(range(len(s)), key=lambda i: (s[i], i))[:k])
        marker = answer_marker(self.task)
        out = []
        for i, text in enumerate(completions):
            if i not in chosen:
                out.append(Rewritten(text, {"poisoned": False}))
                continue
            reasoning, answer = split_reasoning(text, self.task)
            new_reasoning, new_answer = self.corrupt(reasoning, answer, rng, marker)
            out.append(Rewritten(join_reasoning(new_reasoning, new_answer), {"poisoned": True}))
        return out


__all__ = ["CORRUPT_STEPS", "Poison", "corrupt_answer", "corrupt_arithmetic_step", "poisoned_count"]
