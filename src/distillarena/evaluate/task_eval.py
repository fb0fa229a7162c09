"""Task metrics of a model on the built-in world: answer accuracy, step validity, per-position entropy."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distillarena.decoding import SampleResult, sample
from distillarena.models.tokenizer import left_padding
from distillarena.tasks.arithmetic import ArithmeticTask, Problem
from distillarena.tasks.base import Task, TaskProblem
from distillarena.tasks.data import collate, encode_example, problem_example


@dataclass
class TaskEval:
    accuracy: float
    step_validity: float
    n: int
    by_difficulty: dict[int, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    kl_to_undefended: float = 0.0
    tokens_per_s: float = 0.0
    correct: list[bool] = field(default_factory=list)  # per problem, in the order given: paired comparisons

    @property
    def outcomes(self) -> str:
        """The per-problem outcomes as a compact string of 0/1 (stored in run folders for paired intervals)."""
        return "".join("1" if c else "0" for c in self.correct)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "step_validity": self.step_validity, "n": self.n,
                "kl_to_undefended": self.kl_to_undefended, "tokens_per_s": self.tokens_per_s,
                "by_difficulty": {str(k): v for k, v in self.by_difficulty.items()}}


SampleFn = Callable[[torch.Tensor, torch.Tensor], SampleResult]


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 64,
                         sample_fn: SampleFn | None = None) -> tuple[list[str], list[SampleResult]]:
    """Completions of ``prompts`` (greedy unless ``sample_fn`` decodes otherwise), batched with left padding and
    cut at EOS, with the sampler's results (per-token log-probs and KL to the undefended model)."""
    model.eval()
    if sample_fn is None:
        def sample_fn(ids: torch.Tensor, mask: torch.Tensor) -> SampleResult:
            return sample(model, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts: list[str] = []
    results: list[SampleResult] = []
    with left_padding(tokenizer):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            res = sample_fn(enc["input_ids"], enc["attention_mask"])
            texts.extend(res.texts(tokenizer))
            results.append(res)
    return texts, results


def evaluate_problems(model, tokenizer, problems: list[TaskProblem], max_new_tokens: int = 64,
                      n_samples_kept: int = 8, sample_fn: SampleFn | None = None, task: Task | None = None) -> TaskEval:
    """Final-answer accuracy and step validity by difficulty; greedy unless ``sample_fn`` says otherwise.

    With a ``sample_fn`` that decodes a defended teacher this is the teacher's *utility*; ``kl_to_undefended`` is
    then the mean per-token KL(defended || undefended) on the defended teacher's own samples. ``task`` checks the
    completions (default: the arithmetic task's checkers); a task without step checks scores step validity 0.
    """
    task = task if task is not None else ArithmeticTask()
    t0 = time.perf_counter()
    completions, results = generate_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens,
                                                sample_fn=sample_fn)
    seconds = time.perf_counter() - t0
    n_tokens = sum(r.num_tokens for r in results)
    kl = sum(float(r.kl.sum()) for r in results) / max(n_tokens, 1)
    per: dict[int, list[tuple[bool, float]]] = defaultdict(list)
    correct = []
    for p, c in zip(problems, completions, strict=True):
        ok = task.check(p, c)
        correct.append(ok)
        per[p.difficulty].append((ok, task.step_validity(c) or 0.0))
    allr = [r for rs in per.values() for r in rs]
    by = {k: {"accuracy": sum(a for a, _ in rs) / len(rs), "step_validity": sum(s for _, s in rs) / len(rs),
              "n": len(rs)} for k, rs in sorted(per.items())}
    samples = [{"prompt": p.prompt, "completion": c, "answer": p.answer, "correct": task.check(p, c)}
               for p, c in list(zip(problems, completions, strict=True))[:n_samples_kept]]
    return TaskEval(
        accuracy=sum(a for a, _ in allr) / len(allr),
        step_validity=sum(s for _, s in allr) / len(allr),
        n=len(allr), by_difficulty=by, samples=samples, kl_to_undefended=kl,
        tokens_per_s=n_tokens / max(seconds, 1e-9), correct=correct,
    )


@torch.no_grad()
def per_position_entropy(model, tokenizer, problems: list[Problem], batch_size: int = 64,
                         max_positions: int = 48) -> dict[str, list[float]]:
    """Mean entropy (nats) of the next-token distribution at each completion position, teacher-forced on
    reference solutions, separately for problems with one valid solution and with several (step orders, or operands
    that may be swapped).

    A multi-modal teacher shows entropy spikes where the step order is chosen; a collapsed student does not.
    ``first_multi`` holds, per problem with several orders (in order), the entropy at the first completion position
    (where the first step is chosen), for paired intervals.
    """
    sums = {"single": torch.zeros(max_positions), "multi": torch.zeros(max_positions)}
    counts = {"single": torch.zeros(max_positions), "multi": torch.zeros(max_positions)}
    first: list[float] = []  # per problem with several orders: the entropy where the first step is chosen
    model.eval()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = [encode_example(tokenizer, problem_example(p)) for p in chunk]
        batch = collate(enc, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ent = -(logp.exp() * logp).sum(-1)  # [B, T-1], position t predicts token t+1
        valid = batch["labels"][:, 1:] != -100
        for b, p in enumerate(chunk):
            e = ent[b][valid[b]][:max_positions]
            key = "multi" if p.n_solutions > 1 else "single"
            sums[key][: len(e)] += e
            counts[key][: len(e)] += 1
            if key == "multi" and len(e):
                first.append(float(e[0]))
    out = {k: [float(s / c) if c > 0 else float("nan") for s, c in zip(sums[k], counts[k], strict=True)]
           for k in sums}
    out["first_multi"] = first
    return out
