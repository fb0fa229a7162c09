"""Free-running quality of a student against its teacher, per held-out prompt (paired comparisons between two
students on the same prompts):

* :func:`greedy_answers`: each prompt answered greedily (the KV-cached sampler), end-of-turn token included when
  generated;
* :func:`answer_nll`: the teacher's negative log-likelihood of given answers, nats per answer token (how plausible
  the teacher finds what the student *writes*: low for coherent text in the teacher's style, high for gibberish);
* :func:`sequence_divergences`: exact forward KL(teacher || student) and reverse KL(student || teacher) per
  sequence, teacher-forced over its target positions (mean over them), full vocabulary.

Models are plain Hugging Face causal LMs sharing one vocabulary; sequences are token id lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distillarena.decoding import sample

IGNORE_INDEX = -100


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   eos_token_id: int | Sequence[int] | None, pad_token_id: int,
                   batch_size: int = 16) -> list[list[int]]:
    """Greedy completions of ``prompts`` (token ids, EOS kept when generated), in order."""
    was = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        dev = _device(model)
        for b0 in range(0, len(prompts), batch_size):
            part = [list(p) for p in prompts[b0:b0 + batch_size]]
            width = max(len(p) for p in part)
            ids = torch.full((len(part), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, p in enumerate(part):
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            res = sample(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens, temperature=0.0,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            out += [row[:n] for row, n in zip(res.tokens.tolist(), res.lengths.tolist(), strict=True)]
    finally:
        model.train(was)
    return out


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[len(ids), V]`` of one unpadded sequence."""
    x = torch.tensor([ids], dtype=torch.long, device=_device(model))
    return model(input_ids=x, use_cache=False).logits[0].float()


@torch.no_grad()
def answer_nll(teacher: torch.nn.Module, prompts: Sequence[Sequence[int]],
               answers: Sequence[Sequence[int]]) -> list[float | None]:
    """The teacher's mean negative log-likelihood (nats per token) of each answer after its prompt; None for an
    empty answer."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    was = teacher.training
    teacher.eval()
    out: list[float | None] = []
    try:
        for p, a in zip(prompts, answers, strict=True):
            if not a:
                out.append(None)
                continue
            seq = list(p) + list(a)
            logits = _logits(teacher, seq)[len(p) - 1:-1]
            target = torch.tensor(list(a), device=logits.device)
            out.append(float(F.cross_entropy(logits, target, reduction="mean")))
    finally:
        teacher.train(was)
    return out


@torch.no_grad()
def sequence_divergences(student: torch.nn.Module, teacher: torch.nn.Module,
                         sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, list[float]]:
    """Per sequence ``(ids, labels)`` (labels ``-100`` where not a target; a label at ``t`` is predicted from
    ``t - 1``): the mean over its target positions of the exact forward and reverse KL, nats. A sequence without
    target positions is skipped (its entries are absent)."""
    fkl: list[float] = []
    rkl: list[float] = []
    positions: list[int] = []
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        for ids, labels in sequences:
            valid = torch.tensor([lab != IGNORE_INDEX for lab in labels[1:]])
            if not bool(valid.any()):
                continue
            lq = F.log_softmax(_logits(student, list(ids))[:-1][valid.to(_device(student))], -1)
            lp = F.log_softmax(_logits(teacher, list(ids))[:-1][valid.to(_device(teacher))].to(lq.device), -1)
            v = min(lq.shape[-1], lp.shape[-1])
            if lq.shape[-1] != lp.shape[-1]:  # a padded vocabulary: compare the shared rows, renormalised
                lq, lp = F.log_softmax(lq[:, :v], -1), F.log_softmax(lp[:, :v], -1)
            fkl.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
            rkl.append(float((lq.exp() * (lq - lp)).sum(-1).mean()))
            positions.append(int(valid.sum()))
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return {"fkl": fkl, "rkl": rkl, "positions": positions}
