"""The pieces distillation plugs into the one training loop: the micro-batch stream (data regimes and stages), the
on-policy ``prepare`` step, the loss function, and the held-out evaluation.

Everything random is keyed by the run seed and the *global* micro-batch index (``g``), never by a generator that
carries state from step to step: the λ draw (on- or off-policy), the student's samples, HPD's per-position
sample. So resuming at a step reproduces exactly what an uninterrupted run would have done, and N processes
draw exactly what one process would have drawn for the same global batch.

Data position: the stream is a finite pool of examples reshuffled every epoch (a seeded permutation per epoch);
the global micro-batch ``g`` holds examples ``g * batch_size ... (g + 1) * batch_size - 1`` of that endless
sequence. Process ``r`` of ``W`` runs micro-batches ``s * A + r * A / W + i`` (``i < A / W``) at step ``s``,
where ``A`` is the global number of micro-batches per step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.decoding import sample
from distillarena.objectives import LMHeadInput, compute_objective, get_objective
from distillarena.objectives.signals import head_logits
from distillarena.tasks.data import IGNORE_INDEX, collate
from distillarena.teachers.local import final_hidden, output_head


def seed_for(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def generator_for(device: torch.device | str, *parts: object) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_for(*parts))


@dataclass(frozen=True)
class Stage:
    """Steps ``first..last`` (1-based, inclusive) of a schedule, with their objective and data regime."""

    first: int
    last: int
    objective: str
    params: dict[str, Any] = field(default_factory=dict)
    lmbda: float = 0.0
    seq_kd: bool = False

    @property
    def regime(self) -> str:
        if self.lmbda >= 1.0:
            return "on-policy"
        base = "seq_kd" if self.seq_kd else "off-policy"
        return f"{base} + on-policy (lmbda={self.lmbda:g})" if self.lmbda > 0 else base


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    weight: float = 1.0
    teacher: tuple[list[int], list[int]] | None = None  # the same example in the teacher's tokenizer, if it differs

    @property
    def prompt_len(self) -> int:
        for i, lab in enumerate(self.labels):
            if lab != IGNORE_INDEX:
                return i
        return len(self.ids)


# --------------------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------------------


class DistillStream(Iterator[dict[str, Any]]):
    """This process's micro-batches, seekable (``seek(n)``: the next one is its ``n``-th)."""

    def __init__(self, pools: dict[str, list[Encoded]], stages: list[Stage], *, batch_size: int, grad_accum: int,
                 world: int = 1, rank: int = 0, seed: int = 0, pad_id: int = 0, teacher_pad_id: int = 0):
        if not pools.get("data"):
            raise UserError("the training dataset is empty")
        if grad_accum % world:
            raise UserError(f"train.grad_accum ({grad_accum}) must be a multiple of the number of processes "
                            f"({world}): the global batch is batch_size x grad_accum micro-batches, shared out "
                            "among the processes")
        self.pools, self.stages = pools, stages
        self.batch_size, self.grad_accum, self.world, self.rank = batch_size, grad_accum, world, rank
        self.per_rank = grad_accum // world
        self.seed, self.pad_id, self.teacher_pad_id = seed, pad_id, teacher_pad_id
        self.size = len(pools["data"])
        self.n = 0
        self._perms: dict[int, list[int]] = {}

    def seek(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> DistillStream:
        return self

    def stage_index(self, step: int) -> int:
        for i, st in enumerate(self.stages):
            if st.first <= step <= st.last:
                return i
        return len(self.stages) - 1

    def example_at(self, j: int) -> int:
        epoch, r = divmod(j, self.size)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = list(range(self.size))
            random.Random(seed_for(self.seed, "epoch", epoch)).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch][r]

    def global_index(self, n: int) -> tuple[int, int]:
        """(step, global micro-batch index) of this process's ``n``-th micro-batch."""
        step0, i = divmod(n, self.per_rank)
        return step0 + 1, step0 * self.grad_accum + self.rank * self.per_rank + i

    def batch(self, step: int, g: int) -> dict[str, Any]:
        si = self.stage_index(step)
        st = self.stages[si]
        pool = self.pools["seq_kd" if st.seq_kd else "data"]
        idx = [self.example_at(g * self.batch_size + j) for j in range(self.batch_size)]
        exs = [pool[e] for e in idx]
        weights = [e.weight for e in exs]
        batch = collate([(e.ids, e.labels) for e in exs], self.pad_id,
                        weights=weights if any(w != 1.0 for w in weights) else None)
        if exs[0].teacher is not None:  # a teacher with another tokenizer: the same examples in its tokenization
            batch["teacher_batch"] = collate([e.teacher for e in exs], self.teacher_pad_id)
        on_policy = st.lmbda > 0 and random.Random(seed_for(self.seed, "lmbda", g)).random() < st.lmbda
        if not st.seq_kd:
            batch["example_index"] = torch.tensor(idx)
        batch["prompt_len"] = torch.tensor([e.prompt_len for e in exs])
        batch.update(step=step, micro_index=g, stage=si, on_policy=on_policy)
        return batch

    def __next__(self) -> dict[str, Any]:
        step, g = self.global_index(self.n)
        self.n += 1
        return self.batch(step, g)


# --------------------------------------------------------------------------------------------------------------
# Generation (on-policy batches, seq_kd completions)
# --------------------------------------------------------------------------------------------------------------


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                       temperature: float, generator: torch.Generator | None, pad_id: int,
                       eos_id: int | None) -> list[list[int]]:
    """Completions (token ids, EOS included when generated) of ``prompts`` by the project's KV-cached sampler."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, pad_id)
        gen_model, autocast_off = _low_precision_copy(model, device)
        with autocast_off:
            out = sample(gen_model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                         temperature=temperature, eos_token_id=eos_id, pad_token_id=pad_id, generator=generator)
    finally:
        model.train(was_training)
    return [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True)]


def _low_precision_copy(model: torch.nn.Module, device: torch.device):
    """Under autocast (``student.dtype: bfloat16``), a copy of a float32 model in the autocast dtype to sample from,
    and a context that turns autocast off: the KV-cached decoder runs on detached fused weights, which autocast
    would cast again at every matrix multiply of every token (slower than float32 sampling; one cast per call
    instead: docs/decisions.md, issue 16 parts 4-5). Otherwise the model itself."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    params = list(model.parameters())
    if dtype is None or not all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in params):
        return model, contextlib.nullcontext()
    return copy.deepcopy(model).to(dtype), torch.autocast(device.type, enabled=False)


class OnPolicy:
    """The loop's ``prepare`` step: a micro-batch drawn on-policy gets the student's own completions of its
    prompts (sampled with the current weights), which become its labels."""

    def __init__(self, unwrap: Callable[[torch.nn.Module], torch.nn.Module], *, max_new_tokens: int,
                 temperature: float, seed: int, pad_id: int, eos_id: int | None,
                 to_teacher: Callable[[list[int]], list[int]] | None = None, teacher_pad_id: int = 0):
        self.unwrap, self.max_new_tokens, self.temperature = unwrap, max_new_tokens, temperature
        self.seed, self.pad_id, self.eos_id = seed, pad_id, eos_id
        self.to_teacher, self.teacher_pad_id = to_teacher, teacher_pad_id
        self.batches = 0
        self.on_policy = 0

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        self.batches += 1
        if not batch.get("on_policy"):
            return batch
        self.on_policy += 1
        student = self.unwrap(model)
        device = next(student.parameters()).device
        plens = batch["prompt_len"].tolist()
        prompts = [row[:n] for row, n in zip(batch["input_ids"].tolist(), plens, strict=True)]
        gen = generator_for(device, self.seed, "sample", batch["micro_index"])
        completions = sample_completions(student, prompts, max_new_tokens=self.max_new_tokens,
                                         temperature=self.temperature, generator=gen, pad_id=self.pad_id,
                                         eos_id=self.eos_id)
        enc = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions, strict=True)]
        out = collate(enc, self.pad_id)
        if "teacher_batch" in batch:
            # the teacher's twin of each sample: its own prompt, then the student's completion in its tokens
            if self.to_teacher is None:
                raise ValueError("OnPolicy needs to_teacher for a batch with a teacher twin")
            tb = batch["teacher_batch"]
            twins = []
            for row, lab, c in zip(tb["input_ids"].tolist(), tb["labels"].tolist(), completions, strict=True):
                plen = next((i for i, x in enumerate(lab) if x != IGNORE_INDEX), len(lab))
                tc = self.to_teacher(c)
                twins.append((row[:plen] + tc, [IGNORE_INDEX] * plen + tc))
            out["teacher_batch"] = collate(twins, self.teacher_pad_id)
        if "weights" in batch:
            out["weights"] = batch["weights"]
        for k in ("prompt_len", "step", "micro_index", "stage", "on_policy"):
            out[k] = batch[k]
        return out

    def pop_fraction(self) -> float | None:
        if not self.batches:
            return None
        f = self.on_policy / self.batches
        self.batches = self.on_policy = 0
        return f


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------


def weight_groups(labels: Tensor, weights: Tensor | None) -> Iterator[tuple[float, Tensor]]:
    """(weight, labels with every other example's positions ignored) per distinct per-example weight."""
    if weights is None:
        yield 1.0, labels
        return
    for w in torch.unique(weights).tolist():
        if w == 0.0:
            continue
        rows = (weights == w).to(labels.device)
        yield float(w), labels.masked_fill(~rows[:, None], IGNORE_INDEX)


class DistillLoss:
    """``loss_fn(model, batch) -> loss_sum`` for distillation, on the fused path: the student's final hidden
    states and output layer go to :func:`~distillarena.objectives.compute_objective` with the teacher's signal
    at the same shifted positions; per-example weights scale each example's positions."""

    def __init__(self, teacher, stages: list[Stage], *, unwrap: Callable[[torch.nn.Module], torch.nn.Module],
                 seed: int, loss_temperature: float = 1.0, align_vocab: bool = False,
                 chunk_size: int | None = None):
        self.teacher, self.stages, self.unwrap = teacher, stages, unwrap
        self.seed, self.loss_temperature, self.align_vocab, self.chunk_size = (
            seed, loss_temperature, align_vocab, chunk_size)
        self._metrics: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        st = self.stages[batch["stage"]]
        labels = batch["labels"][:, 1:]
        head_weight = self.unwrap(model).get_output_embeddings().weight
        if head_weight.dim() == 2 and head_weight.numel() > 0:
            hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
            student: LMHeadInput | Tensor = output_head(self.unwrap(model), hidden[:, :-1])
        else:
            # the output layer is sharded (FSDP, DeepSpeed ZeRO-3): no whole weight to fuse with, so the loss
            # takes the logits the wrapped model computes (the engine still works chunk by chunk in float32)
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            student = hidden[:, :-1]
        device = hidden.device
        spec = get_objective(st.objective)
        needs_teacher = self.teacher.kind != "text" and spec.uses_teacher
        signal = self.teacher.signal(batch, device) if needs_teacher else None
        params = dict(st.params)
        gen = generator_for(device, self.seed, "objective", batch["micro_index"])
        if signal is not None and signal.kind in spec.adapts:
            signal = spec.prepare_signal(student, signal, labels, gen, params)
        total: Tensor | None = None
        for w, lab in weight_groups(labels, batch.get("weights")):
            out = compute_objective(st.objective, student, signal, lab, temperature=self.loss_temperature,
                                    chunk_size=self.chunk_size, align_vocab=self.align_vocab, generator=gen,
                                    **params)
            part = out.loss_sum if w == 1.0 else out.loss_sum * w
            total = part if total is None else total + part
            for k, v in out.metrics.items():
                acc = self._metrics[k]
                acc[0] += v * out.count
                acc[1] += out.count
        if total is None:  # every example has weight 0
            total = hidden.sum() * 0.0
        return total

    def pop_metrics(self) -> dict[str, float]:
        out = {k: s / c for k, (s, c) in self._metrics.items() if c > 0}
        self._metrics.clear()
        return out


# --------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_divergences(student: torch.nn.Module, teacher, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Exact forward KL(teacher || student), reverse KL(student || teacher), and both entropies (nats), averaged
    over the teacher-forced target positions of ``batches`` (full vocabulary, chunked over positions)."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    n = 0
    try:
        device = next(student.parameters()).device
        for b in batches:
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            valid = (b["labels"][:, 1:] != IGNORE_INDEX).to(device)
            hs = final_hidden(student, ids, mask)[:, :-1][valid]
            sh = output_head(student, hs)
            th = teacher.head(ids, mask, device)
            ht = th.hidden[:, :-1][valid]
            v = min(sh.vocab_size, th.vocab_size)
            rows = max(1, (1 << 22) // max(v, 1))
            for c0 in range(0, hs.shape[0], rows):
                lq = torch.log_softmax(head_logits(sh, hs[c0:c0 + rows])[:, :v], -1)
                lp = torch.log_softmax(head_logits(th, ht[c0:c0 + rows])[:, :v], -1)
                p, q = lp.exp(), lq.exp()
                sums += torch.stack([(p * (lp - lq)).sum(), (q * (lq - lp)).sum(), -(q * lq).sum(),
                                     -(p * lp).sum()]).double().cpu()
            n += int(hs.shape[0])
    finally:
        student.train(was_training)
    if n == 0:
        return {}
    fkl, rkl, hs_, ht_ = (float(x) / n for x in sums)
    return {"heldout_fkl": fkl, "heldout_rkl": rkl, "student_entropy": hs_, "teacher_entropy": ht_,
            "heldout_positions": n}


@torch.no_grad()
def heldout_nll(student: torch.nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, Any]:
    """The student's negative log-likelihood of the held-out text, teacher-forced: ``heldout_nll`` (nats per target
    token, over all of them) and ``heldout_nll_by_example`` (each sequence's mean, for paired comparisons between
    runs). The measure of closeness that needs no shared vocabulary (the text is the teacher's when it generated
    it)."""
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    per_example: list[float] = []
    try:
        device = next(student.parameters()).device
        for b in batches:
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            labels = b["labels"][:, 1:].to(device)
            valid = labels != IGNORE_INDEX
            hs = final_hidden(student, ids, mask)[:, :-1][valid]
            sh = output_head(student, hs)
            lab = labels[valid]
            rows = max(1, (1 << 22) // max(sh.vocab_size, 1))
            nll = torch.cat([torch.logsumexp(z, -1) - z.gather(-1, lab[c0:c0 + rows, None]).squeeze(-1)
                             for c0 in range(0, hs.shape[0], rows)
                             for z in (head_logits(sh, hs[c0:c0 + rows]),)]) if hs.shape[0] else hs.new_zeros(0)
            total += float(nll.sum())
            n += int(lab.numel())
            counts = valid.sum(1).tolist()
            for part, c in zip(nll.split(counts), counts, strict=True):
                if c:
                    per_example.append(float(part.mean()))
    finally:
        student.train(was_training)
    if not n:
        return {}
    return {"heldout_nll": total / n, "heldout_nll_positions": n, "heldout_nll_by_example": per_example}


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
