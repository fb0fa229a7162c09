"""The valuation of :mod:`.valuation` on causal language models: traces and holdout examples are encoded
``(ids, labels)`` pairs (labels ``-100`` on the prompt), and a trace's loss is its mean token NLL over its
completion (length-normalised, as in the reference code); the holdout loss is the mean over holdout examples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from distillarena.attacks.valuation import Valuation, fd_values, holdout_direction, oracle_values, trainable
from distillarena.core.errors import UserError
from distillarena.tasks.data import IGNORE_INDEX, collate

EncodedPair = tuple[list[int], list[int]]


def per_sequence_nll(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token NLL over each row's completion tokens ``[B]`` (0 for a row with none), with gradient."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    target = batch["labels"][:, 1:].to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    scored = target != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    return (nll * scored).sum(-1) / scored.sum(-1).clamp(min=1)


def batches(encoded: Sequence[EncodedPair], pad_id: int, batch_size: int = 64) -> Iterator[dict[str, Tensor]]:
    for i in range(0, len(encoded), batch_size):
        yield collate(list(encoded[i : i + batch_size]), pad_id)


def holdout_loss_fn(holdout: Sequence[EncodedPair], pad_id: int, batch_size: int = 64):
    """``L_H`` as per-batch terms: Σ_batches Σ_rows nll / N (the mean over holdout examples)."""
    if not holdout:
        raise UserError("the attacker's holdout set is empty: the adaptive value needs holdout examples")
    n = len(holdout)

    def fn(model: torch.nn.Module) -> Iterator[Tensor]:
        for b in batches(holdout, pad_id, batch_size):
            yield per_sequence_nll(model, b).sum() / n

    return fn


def trace_losses_fn(traces: Sequence[EncodedPair], pad_id: int, batch_size: int = 64):
    def fn(model: torch.nn.Module) -> Tensor:
        with torch.no_grad():
            return torch.cat([per_sequence_nll(model, b).detach().cpu() for b in batches(traces, pad_id, batch_size)])

    return fn


def value_traces(model: torch.nn.Module, traces: Sequence[EncodedPair], holdout: Sequence[EncodedPair], *, pad_id: int,
                 eps: float = 1e-2, batch_size: int = 64) -> Valuation:
    """The value ``a_i`` of every trace for ``model`` (see :mod:`.valuation` for the definition and sign)."""
    if not traces:
        raise UserError("there are no traces to value")
    u, norm = holdout_direction(model, holdout_loss_fn(holdout, pad_id, batch_size))
    a = fd_values(model, trace_losses_fn(traces, pad_id, batch_size), u, eps)
    return Valuation(a, norm, eps)


def oracle_traces(model: torch.nn.Module, traces: Sequence[EncodedPair], holdout: Sequence[EncodedPair],
                  indices: Sequence[int], *, pad_id: int, lr: float, batch_size: int = 64) -> Tensor:
    """The holdout-loss decrease after one SGD step (``lr``) on each trace of ``indices``."""

    def step_loss(m: torch.nn.Module, i: int) -> Tensor:
        return per_sequence_nll(m, collate([traces[i]], pad_id))[0]

    return oracle_values(model, step_loss, holdout_loss_fn(holdout, pad_id, batch_size), indices, lr)


def trace_gradient_values(model: torch.nn.Module, traces: Sequence[EncodedPair], direction: Sequence[Tensor], *,
                          pad_id: int) -> tuple[Tensor, Tensor]:
    """For every trace, the exact projection ``<∇NLL_i, u>`` of its loss gradient on the unit holdout direction
    ``u`` and the gradient's norm ``||∇NLL_i||`` (float64 ``[N]`` each): one backward pass per trace."""
    params = trainable(model)
    was = model.training
    model.eval()
    proj, norms = [], []
    try:
        for enc in traces:
            loss = per_sequence_nll(model, collate([enc], pad_id))[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            dot = sq = 0.0
            for g, u in zip(grads, direction, strict=True):
                if g is not None:
                    g = g.double()
                    dot += float((g * u.double()).sum())
                    sq += float(g.pow(2).sum())
            proj.append(dot)
            norms.append(math.sqrt(sq))
    finally:
        model.train(was)
    return torch.tensor(proj, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64)


def cosine_values(model: torch.nn.Module, traces: Sequence[EncodedPair], holdout: Sequence[EncodedPair], *,
                  pad_id: int, batch_size: int = 64) -> tuple[Tensor, Tensor, Tensor, float]:
    """The cosine between each trace's NLL gradient and the holdout-loss gradient (the value without the
    gradient-norm confound), with the exact projections and the gradient norms it divides, and ``||g||``."""
    if not traces:
        raise UserError("there are no traces to value")
    u, norm = holdout_direction(model, holdout_loss_fn(holdout, pad_id, batch_size))
    proj, norms = trace_gradient_values(model, traces, u, pad_id=pad_id)
    cos = torch.where(norms > 0, proj / norms.clamp(min=1e-30), torch.zeros_like(proj))
    return cos, proj, norms, norm
