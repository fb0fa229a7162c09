"""One attacker on one trace set: encode the traces, value and weight (or filter) them, train the student in the
project's one loop (weighted SFT on the text, or forward KL to the revealed top-k log-probs).

Weights are per trace, normalised to mean 1 over the traces; the loop normalises by the global count of target
tokens, so a trace's weight scales each of its tokens (as ``tasks.data.collate(..., weights=...)`` batches do
everywhere in the project). The passive student trains on the same token-averaged loss, so the passive and the
adaptive students differ only in the weights (the reference code also changes the length weighting).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from distillarena.attacks import oracle_traces, spearman, top_fraction, value_traces, value_weights, weight_stats
from distillarena.core.errors import UserError
from distillarena.game.config import AttackerConfig, GameConfig
from distillarena.objectives import TeacherSignal, get_objective
from distillarena.tasks.data import IGNORE_INDEX, Example, encode_example
from distillarena.teachers.local import TextTeacher
from distillarena.train.distill import DistillLoss, DistillStream, Encoded, Stage
from distillarena.train.loop import LoopConfig, train

REVEALED_FLOOR = -30.0  # a revealed -inf (a token the defense excludes) enters the KD target as exp(-30)


class RevealedTopK:
    """The revealed top-k log-probs of each trace as a training signal (``kind = "topk"``): rows aligned with the
    trace's sampled tokens, so the encoded example is ``prompt ids + sampled tokens``. The tail bucket is the
    mass the revealed values leave (floored at 1e-6: rounded values may sum to slightly more than 1)."""

    kind = "topk"

    def __init__(self, rows: list[tuple[Tensor, Tensor]]):
        self.rows = rows
        self.k = int(rows[0][0].shape[-1]) if rows else 1

    def signal(self, batch: dict[str, Any], device: torch.device | None = None) -> TeacherSignal:
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        device = device or labels.device
        shape = (*labels.shape, self.k)
        ids = torch.zeros(shape, dtype=torch.long, device=device)
        lps = torch.full(shape, REVEALED_FLOOR, dtype=torch.float32, device=device)
        for b, e in enumerate(batch["example_index"].tolist()):
            r_ids, r_lps = self.rows[e]
            pos = valid[b].nonzero().squeeze(-1).to(device)
            if len(pos) != len(r_ids):
                raise UserError(f"trace {e}: {len(r_ids)} revealed rows for {len(pos)} target positions")
            ids[b, pos] = r_ids.to(device)
            lps[b, pos] = r_lps.to(device)
        tail = torch.log1p(-lps.exp().sum(-1).clamp(max=1 - 1e-6))
        return TeacherSignal.topk(ids, lps, tail)


def encode_traces(records: list[dict[str, Any]], tok, *, objective: str, forced: bool = False
                  ) -> tuple[list[tuple[list[int], list[int]]], RevealedTopK | None]:
    """SFT: the completion *text* re-encoded (what a text API reveals; the answer-forced text if ``forced``).
    KD: the sampled token ids, with the revealed top-k rows aligned to them."""
    if not get_objective(objective).uses_teacher:
        enc = [encode_example(tok, Example(prompt=r["prompt"],
                                           completion=r["forced_completion"] if forced else r["completion"]))
               for r in records]
        return enc, None
    enc, rows = [], []
    for r in records:
        if "top_ids" not in r:
            raise UserError(f"objective {objective} needs revealed top-k log-probs in the traces (set reveal.top_k)")
        p = tok(r["prompt"])["input_ids"]
        toks = list(r["tokens"])
        enc.append((p + toks, [IGNORE_INDEX] * len(p) + toks))
        lps = torch.tensor(r["top_logprobs"], dtype=torch.float32)
        rows.append((torch.tensor(r["top_ids"], dtype=torch.long),
                     torch.nan_to_num(lps, neginf=REVEALED_FLOOR).clamp(min=REVEALED_FLOOR)))
    return enc, RevealedTopK(rows)


@dataclass
class Plan:
    """What the attacker trains on: example indices kept and their weights, plus what valuation measured."""

    keep: list[int]
    weights: list[float]
    info: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None


def plan_attack(attacker: AttackerConfig, student: torch.nn.Module, traces: list, holdout: list, *, pad_id: int,
                cfg: GameConfig, seed: int) -> Plan:
    n = len(traces)
    if attacker.kind == "passive":
        return Plan(list(range(n)), [1.0] * n)
    t0 = time.perf_counter()
    val = value_traces(student, traces, holdout, pad_id=pad_id, eps=attacker.eps)
    a = val.values
    info: dict[str, Any] = {"valuation_s": time.perf_counter() - t0, "holdout_grad_norm": val.grad_norm}
    if attacker.kind == "adaptive":
        w = value_weights(a, attacker.beta, sign=attacker.sign, clip=attacker.clip,
                          standardized=attacker.standardize)
        plan = Plan(list(range(n)), [float(x) for x in w], info, [float(x) for x in a])
        info.update(weight_stats(a, w))
    else:
        keep = top_fraction(a, attacker.keep, sign=attacker.sign).tolist()
        plan = Plan(keep, [1.0] * len(keep), info, [float(x) for x in a])
        info["kept"] = len(keep)
    if cfg.oracle.n_traces:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(n, generator=g)[: cfg.oracle.n_traces].tolist())
        t1 = time.perf_counter()
        oracle = oracle_traces(student, traces, holdout, idx, pad_id=pad_id, lr=cfg.oracle.lr)
        # the cheap value against the oracle (both: higher = the trace lowers the holdout loss more), whatever
        # sign the attacker then tilts with
        rho = spearman(a[idx], oracle)
        info.update(oracle_spearman=rho if math.isfinite(rho) else None, oracle_n=len(idx),
                    oracle_s=time.perf_counter() - t1,
                    oracle_mean_decrease=float(oracle.mean()))
    return plan


def train_student(student: torch.nn.Module, traces: list, plan: Plan, topk: RevealedTopK | None,
                  attacker: AttackerConfig, cfg: GameConfig, *, seed: int, pad_id: int) -> torch.nn.Module:
    """Train ``student`` (in place) on the planned traces in the one loop."""
    pool = [Encoded(traces[i][0], traces[i][1], w) for i, w in zip(plan.keep, plan.weights, strict=True)]
    objective = attacker.objective
    teacher: Any = TextTeacher()
    if get_objective(objective).uses_teacher:
        assert topk is not None
        teacher = RevealedTopK([topk.rows[i] for i in plan.keep])
    stages = [Stage(1, cfg.train.steps, objective, {})]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    stream = DistillStream({"data": pool}, stages, batch_size=cfg.train.batch_size, grad_accum=1, seed=seed,
                           pad_id=pad_id)
    loss_fn = DistillLoss(teacher, stages, unwrap=accelerator.unwrap_model, seed=seed)
    loop = LoopConfig.from_settings(cfg.train, log_every=max(cfg.train.steps, 1))
    torch.manual_seed(seed)
    return train(student, stream, loss_fn, loop, accelerator=accelerator)
