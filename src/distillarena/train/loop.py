"""The one training loop (on ``accelerate``) used by every job: teacher training, distillation, attackers.

A job supplies a stream of micro-batches and a ``loss_fn(model, batch) -> loss_sum`` that returns the
*sum* of its per-token losses. The loop counts the valid target tokens of every micro-batch of an
optimizer step on every process first, then backpropagates ``loss_sum / global_count``, so gradient
accumulation and data parallelism give exactly the update of one big batch, however unevenly the valid
tokens are spread over micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from ..tasks.data import IGNORE_INDEX

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class LoopConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    log_every: int = 25
    eval_every: int = 0  # 0: only at the end
    optimizer: str = "adamw"  # or "sgd" (plain steps: handy to compare updates exactly)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Valid target positions of a causal LM batch: labels shifted by one, ``-100`` ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the completion tokens (plain supervised training)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                                             reduction="sum")


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float


def train(
    model: torch.nn.Module,
    micro_batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    config: LoopConfig,
    *,
    accelerator: Accelerator | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    on_eval: Callable[[int], dict[str, Any]] | None = None,
    progress: Any | None = None,
) -> torch.nn.Module:
    """Train ``model`` for ``config.steps`` optimizer steps and return the unwrapped model.

    ``progress`` is an optional ``rich.progress.Progress``; a task on it advances per step.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'adamw' or 'sgd'")
    scheduler = _cosine_with_floor(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    world = accelerator.num_processes
    task = progress.add_task("training", total=config.steps) if progress is not None else None
    t0 = time.perf_counter()
    tokens_total = 0
    for step in range(1, config.steps + 1):
        group = [next(micro_batches) for _ in range(config.grad_accum)]
        local = sum(count_targets(b) for b in group)
        global_count = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(group):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            last = i == len(group) - 1
            ctx = accelerator.no_sync(model) if not last else contextlib.nullcontext()
            with ctx:
                loss_sum = loss_fn(model, batch)
                # DDP averages gradients over processes; multiplying by the world size turns that average
                # back into a sum, so the result is (sum over all tokens) / (global token count).
                loss = loss_sum * world / max(global_count, 1)
                accelerator.backward(loss)
            step_loss += loss_sum.detach()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_total += global_count
        if task is not None:
            progress.advance(task)
        if on_log and (step % config.log_every == 0 or step == config.steps):
            mean_loss = float(accelerator.reduce(step_loss, "sum")) / max(global_count, 1)
            elapsed = time.perf_counter() - t0
            on_log(StepLog(step, mean_loss, scheduler.get_last_lr()[0], tokens_total,
                           tokens_total / elapsed, elapsed))
        if on_eval and config.eval_every and step % config.eval_every == 0 and step != config.steps:
            model.eval()
            on_eval(step)
            model.train()
    model.eval()
    return accelerator.unwrap_model(model)


def _cosine_with_floor(optimizer: torch.optim.Optimizer, config: LoopConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak (never to zero)."""
    if config.min_lr_ratio <= 0:
        return get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(config.warmup_steps, 1)
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cos

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

