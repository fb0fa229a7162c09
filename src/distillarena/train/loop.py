"""The one training loop (on ``accelerate``) used by every job: teacher training, distillation, attackers.

A job supplies a stream of micro-batches and a ``loss_fn(model, batch) -> loss_sum`` that returns the
*sum* of its per-token losses. The loop counts the valid target tokens of every micro-batch of an
optimizer step on every process first, then backpropagates ``loss_sum / global_count``, so gradient
accumulation and data parallelism give exactly the update of one big batch, however unevenly the valid
tokens are spread over micro-batches and ranks.

Optional pieces, all used by distillation:

* ``prepare(model, batch) -> batch`` runs on every micro-batch of a step *before* the tokens are counted, with
  the current weights: on-policy sampling replaces a batch's completions here.
* Checkpoints (``checkpoint_dir`` and ``LoopConfig.checkpoint_every``) hold the model, optimizer, scheduler,
  step, data position and RNG states; ``resume=True`` continues from the latest one, so that an interrupted
  run ends with the same weights as an uninterrupted one. The data position is restored by calling
  ``micro_batches.seek(n)`` (``n`` micro-batches of this process already consumed) when the stream has that
  method, otherwise by drawing and dropping ``n`` micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from distillarena.decoding import forget_fused_weights
from distillarena.tasks.data import IGNORE_INDEX
from distillarena.train import checkpoint as ckpt

LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
PrepareFn = Callable[[torch.nn.Module, dict[str, Any]], dict[str, Any]]


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
    checkpoint_every: int = 0  # 0: no checkpoints (with a checkpoint_dir, the last step is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> LoopConfig:
        """The loop's settings from a config section that names them the same way (``TrainConfig``,
        ``GameTrainConfig``, ...): fields the section lacks keep their defaults; ``overrides`` win."""
        given = {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)}
        return cls(**{**given, **overrides})


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


def full_precision_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that runs the model as given (mixed precision is the student's ``dtype``, applied by
    ``train.student.precision``). accelerate keeps one process-wide state and a later ``Accelerator()`` inherits
    it: after a trainer that asked for bf16 in the same process (TRL's and HF's ``TrainingArguments`` default to
    bf16 on CPUs that support it), every model prepared afterwards would silently run under bf16 autocast. So a
    mixed-precision state left behind is cleared first (the process group, ``PartialState``, is kept)."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", **kwargs)


def train(
    model: torch.nn.Module,
    micro_batches: Iterator[dict[str, Any]],
    loss_fn: LossFn,
    config: LoopConfig,
    *,
    accelerator: Accelerator | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    on_eval: Callable[[int], dict[str, Any]] | None = None,
    progress: Any | None = None,
    prepare: PrepareFn | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = False,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> torch.nn.Module:
    """Train ``model`` for ``config.steps`` optimizer steps and return the unwrapped model.

    ``progress`` is an optional ``rich.progress.Progress``; a task on it advances per step. ``prepare`` is
    applied to every micro-batch before counting (see the module docstring). With ``checkpoint_dir``, a
    checkpoint is written every ``config.checkpoint_every`` steps and at the last step (by the main process);
    ``resume=True`` restores the latest one found there (none: start from step 0).
    """
    accelerator = accelerator or full_precision_accelerator()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        # fused: one kernel per step instead of a dozen per tensor, much cheaper on CPU than the default
        # single-tensor loop (TRL's Trainer uses it too)
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                     and type(p) is torch.nn.Parameter for p in params)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused or None)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; expected 'adamw' or 'sgd'")
    scheduler = _cosine_with_floor(optimizer, config)

    start_step, tokens_total, elapsed_before = 0, 0, 0.0
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_root is not None and accelerator.is_main_process:
        ckpt.remove_partial(ckpt_root)
    if resume and ckpt_root is not None and (found := ckpt.latest_checkpoint(ckpt_root)) is not None:
        saved = ckpt.load_checkpoint(found)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        start_step = int(state["step"])
        tokens_total = int(state.get("tokens", 0))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rngs = saved["rng"]
        ckpt.set_rng_state(rngs[accelerator.process_index] if accelerator.process_index < len(rngs) else rngs[0])
        consumed = start_step * config.grad_accum
        if hasattr(micro_batches, "seek"):
            micro_batches.seek(consumed)
        else:
            for _ in range(consumed):
                next(micro_batches)

    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    world = accelerator.num_processes
    task = None
    if progress is not None:
        task = progress.add_task("training", total=config.steps, completed=start_step)
    t0 = time.perf_counter() - elapsed_before
    for step in range(start_step + 1, config.steps + 1):
        group = [next(micro_batches) for _ in range(config.grad_accum)]
        if prepare is not None:
            group = [prepare(model, b) for b in group]
        local = sum(count_targets(b) for b in group)
        global_count = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(group):
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
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
        forget_fused_weights(accelerator.unwrap_model(model))  # a fused step does not bump versions: see there
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_total += global_count
        ckpt.maybe_crash("step", step)
        if task is not None:
            progress.advance(task)
        if on_log and (step % config.log_every == 0 or step == config.steps):
            mean_loss = float(accelerator.reduce(step_loss, "sum")) / max(global_count, 1)
            elapsed = time.perf_counter() - t0
            on_log(StepLog(step, mean_loss, scheduler.get_last_lr()[0], tokens_total,
                           tokens_total / max(elapsed, 1e-9), elapsed))
        if on_eval and config.eval_every and step % config.eval_every == 0 and step != config.steps:
            model.eval()
            on_eval(step)
            model.train()
        if ckpt_root is not None and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                      or step == config.steps):
            path = _save(ckpt_root, step, accelerator, model, optimizer, scheduler, config,
                         {"tokens": tokens_total, "elapsed_s": time.perf_counter() - t0,
                          "micro_batches_consumed": step * config.grad_accum, "world_size": world})
            if on_checkpoint is not None and path is not None:
                on_checkpoint(step, path)
    model.eval()
    return accelerator.unwrap_model(model)


def _save(root: Path, step: int, accelerator: Accelerator, model, optimizer, scheduler, config: LoopConfig,
          state: dict[str, Any]) -> Path | None:
    """Every process contributes its RNG state; the main process writes; all wait until it is in place."""
    rngs = [ckpt.rng_state()]
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        rngs = [None] * accelerator.num_processes
        dist.all_gather_object(rngs, ckpt.rng_state())
    path = None
    model_state = accelerator.get_state_dict(model)  # a collective under FSDP / DeepSpeed: every process calls it
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(
            root, step, model_state=model_state, optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(), rng_states=rngs, state=state, keep=config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


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

