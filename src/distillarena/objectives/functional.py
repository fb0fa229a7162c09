"""Convenience functions with familiar signatures, on top of :func:`compute_objective`.

``generalized_jsd_loss`` keeps TRL's signature and numbers (``GKDTrainer.generalized_jsd_loss``, TRL 1.16):

* ``beta`` weighs the teacher; ``M = beta p_T + (1 - beta) p_S``; the value is
  ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``, and ``beta == 0`` / ``beta == 1`` are exactly ``KL(p_T ||
  p_S)`` / ``KL(p_S || p_T)``. For ``0 < beta < 1`` the value tends to ``beta KL(T||S)`` and ``(1 - beta)
  KL(S||T)`` near the ends, so it is discontinuous at beta = 0 and 1 (TRL's docs say the ends "approximate"
  forward/reverse KL). Pass ``unscaled=True`` for the version divided by ``beta (1 - beta)``, continuous on
  [0, 1].
* ``temperature`` divides both logits; no ``T**2`` factor.
* ``reduction``: "batchmean" divides the sum by the number of valid tokens when labels are given, and by
  ``student_logits.size(0)`` when they are not (TRL's behaviour, inherited from ``F.kl_div``); "sum"; "mean"
  divides by the number of *elements* (tokens x vocabulary), as TRL does; anything else ("none") returns the
  per-element divergence ``[n_valid, V]`` (or the input's shape without labels), which materialises the full
  tensor. ``num_items_in_batch`` overrides the reduction: ``sum / num_items_in_batch``.

Differences from TRL: the result is float32 even for bf16 inputs (TRL computes in the input dtype);
computation is chunked (the full ``[tokens, V]`` tensors of TRL are never built, except for
``reduction="none"``); a batch with no valid token gives 0 for every reduction (TRL's "mean" gives NaN there);
vocabulary mismatch is a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives.engine import compute_objective
from distillarena.objectives.signals import IGNORE_INDEX, TeacherSignal

__all__ = ["generalized_jsd_loss", "hpd_loss"]


def _elementwise_jsd(s: Tensor, t: Tensor, beta: float, unscaled: bool) -> Tensor:
    lq = F.log_softmax(s.float(), dim=-1)
    lp = F.log_softmax(t.float(), dim=-1)
    if beta == 0.0:
        return lp.exp() * (lp - lq)
    if beta == 1.0:
        return lq.exp() * (lq - lp)
    b = torch.tensor(beta, dtype=lq.dtype)
    lm = torch.logaddexp(lq + torch.log1p(-b), lp + torch.log(b))
    out = beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)
    return out / (beta * (1 - beta)) if unscaled else out


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | Tensor | None = None,
    *,
    unscaled: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """TRL's ``generalized_jsd_loss`` (same signature, beta convention and reductions), computed chunk by
    chunk.

    student_logits, teacher_logits: ``[B, T, V]`` or ``[N, V]``; labels: ``[B, T]`` / ``[N]`` with -100 to
    ignore.
    """
    if not 0.0 <= float(beta) <= 1.0:
        raise UserError(f"beta must be in [0, 1], got {beta}")
    beta = float(beta)
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise UserError(
                f"student vocabulary size {student_logits.shape[-1]} differs from the teacher's "
                f"{teacher_logits.shape[-1]}"
            )
        out = _elementwise_jsd(student_logits / temperature, teacher_logits / temperature, beta, unscaled)
        if labels is not None:
            out = out[labels != IGNORE_INDEX]
        return out
    res = compute_objective(
        "jsd",
        student_logits,
        TeacherSignal.dense(teacher_logits),
        labels,
        temperature=temperature,
        chunk_size=chunk_size,
        beta=beta,
        unscaled=unscaled,
    )
    total = res.loss_sum
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        denom = res.count if labels is not None else student_logits.shape[0]
        return total / max(denom, 1)
    # "mean": over elements, tokens x vocabulary (res.count is every position when labels is None)
    return total / max(res.count * student_logits.shape[-1], 1)


def hpd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | TeacherSignal,
    labels: Tensor,
    sampled_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reinforce: bool = True,
    use_sample: bool = True,
    sample_temperature: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """HPD loss averaged over this batch's valid positions, and its diagnostics.

    For gradient accumulation or data parallelism use ``compute_objective("hpd", ...)`` and divide its
    ``loss_sum`` by the global token count instead of averaging per micro-batch.

    student_logits: ``[B, T, V]`` or ``[N, V]`` (labels already shifted to align with them).
    teacher_logits: the same shape, or any TeacherSignal hpd accepts (dense, token_logprobs with sampled
    tokens). sampled_ids: one student token per position (same shape as labels); drawn from
    ``softmax(student_logits)``
        with ``generator`` when not given.
    """
    params: dict[str, Any] = {
        "reinforce": reinforce,
        "use_sample": use_sample,
        "sample_temperature": sample_temperature,
    }
    if sampled_ids is not None:
        params["sampled_ids"] = sampled_ids
    teacher = teacher_logits if isinstance(teacher_logits, TeacherSignal) else TeacherSignal.dense(teacher_logits)
    out = compute_objective(
        "hpd",
        student_logits,
        teacher,
        labels,
        temperature=temperature,
        chunk_size=chunk_size,
        generator=generator,
        **params,
    )
    return out.mean(), out.metrics
