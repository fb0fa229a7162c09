"""Task metrics of a model on the built-in world: answer accuracy, step validity, per-position entropy."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..tasks.arithmetic import Problem, check_answer, step_validity
from ..tasks.data import collate, encode_example, problem_example


@dataclass
class TaskEval:
    accuracy: float
    step_validity: float
    n: int
    by_difficulty: dict[int, dict[str, float]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "step_validity": self.step_validity, "n": self.n,
                "by_difficulty": {str(k): v for k, v in self.by_difficulty.items()}}


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                         batch_size: int = 64) -> list[str]:
    """Greedy completions, batched with left padding, cut at EOS."""
    model.eval()
    out: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def evaluate_problems(model, tokenizer, problems: list[Problem], max_new_tokens: int = 64,
                      n_samples_kept: int = 8) -> TaskEval:
    completions = generate_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    per: dict[int, list[tuple[bool, float]]] = defaultdict(list)
    for p, c in zip(problems, completions, strict=True):
        per[p.n_ops].append((check_answer(p, c), step_validity(c)))
    allr = [r for rs in per.values() for r in rs]
    by = {k: {"accuracy": sum(a for a, _ in rs) / len(rs), "step_validity": sum(s for _, s in rs) / len(rs),
              "n": len(rs)} for k, rs in sorted(per.items())}
    samples = [{"prompt": p.prompt, "completion": c, "answer": p.answer, "correct": check_answer(p, c)}
               for p, c in list(zip(problems, completions, strict=True))[:n_samples_kept]]
    return TaskEval(
        accuracy=sum(a for a, _ in allr) / len(allr),
        step_validity=sum(s for _, s in allr) / len(allr),
        n=len(allr), by_difficulty=by, samples=samples,
    )


@torch.no_grad()
def per_position_entropy(model, tokenizer, problems: list[Problem], batch_size: int = 64,
                         max_positions: int = 48) -> dict[str, list[float]]:
    """Mean entropy (nats) of the next-token distribution at each completion position, teacher-forced on
    reference solutions, separately for problems with one valid step order and with several.

    A multi-modal teacher shows entropy spikes where the step order is chosen; a collapsed student does not.
    """
    sums = {"single": torch.zeros(max_positions), "multi": torch.zeros(max_positions)}
    counts = {"single": torch.zeros(max_positions), "multi": torch.zeros(max_positions)}
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
            key = "multi" if len(p.step_orders) > 1 else "single"
            sums[key][: len(e)] += e
            counts[key][: len(e)] += 1
    return {k: [float(s / c) if c > 0 else float("nan") for s, c in zip(sums[k], counts[k], strict=True)]
            for k in sums}
