"""One attacker on one trace set: encode the traces, ask the attacker's planner (its kind's module, from the table
in :mod:`distillarena.attacks.spec`) which traces to keep, with which weights and replacements, and train the
student in the project's one loop (weighted SFT on the text, or a KD objective on the revealed or recovered top-k).

Weights are per trace, normalised to mean 1 over the traces; the loop normalises by the global count of target
tokens, so a trace's weight scales each of its tokens (as ``tasks.data.collate(..., weights=...)`` batches do
everywhere in the project). The passive student trains on the same token-averaged loss, so the passive and the
adaptive students differ only in the weights (the reference code also changes the length weighting).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from torch import Tensor

from distillarena.attacks import get_planner
from distillarena.attacks.plan import AttackContext, Plan, Replacement, attacker_view

__all__ = ["Plan", "Replacement", "RevealedTopK", "apply_plan", "attack_context", "encode_traces", "plan_attack",
           "recovered_kl", "train_student"]
from distillarena.core.errors import UserError
from distillarena.defenses.paraphrase import paraphrase_lines
from distillarena.defenses.spec import public_params
from distillarena.game.config import AttackerConfig, GameConfig
from distillarena.objectives import TeacherSignal, get_objective
from distillarena.tasks.data import IGNORE_INDEX, Example, encode_example
from distillarena.teachers.local import TextTeacher
from distillarena.train.distill import DistillLoss, DistillStream, Encoded, Stage
from distillarena.train.loop import LoopConfig, full_precision_accelerator, train

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


def missing_logprobs(records: list[dict[str, Any]], over_api: bool) -> str | None:
    """Why these traces cannot feed an attacker that needs revealed log-probs (None: they can)."""
    if all("top_ids" in r for r in records):
        return None
    if over_api:
        return ("the API key of this defense reveals no top-k log-probs: the traces have text only (the attacker "
                "needs log-probs)")
    return "the traces carry no revealed top-k log-probs (reveal.top_k unset, or the defense rewrites the text)"


def attack_context(attacker: AttackerConfig, records: list[dict[str, Any]], student: torch.nn.Module, tok, *,
                   task, defense, cfg: GameConfig, seed: int, holdout, load_model) -> AttackContext:
    """One cell's :class:`AttackContext`: the traces as the attacker bought them, encoded for its objective."""
    objective = attacker.training_objective
    over_api = cfg.api is not None
    k = attacker.samples_per_prompt
    enc: list = []
    topk = None
    if not (get_objective(objective).uses_teacher and missing_logprobs(records, over_api)):
        enc, topk = encode_traces(records, tok, objective=objective, forced=cfg.answer_forcing)
    pool = task.problems("train", cfg.budget // k, cfg.prompts.n_ops, seed=cfg.prompts.seed)
    problems = [pool[int(r["index"]) // k] for r in records]
    public = defense.model_copy(update={"params": public_params(defense.kind, defense.params)})
    return AttackContext(
        records=[_public_view(r) for r in records], encoded=enc, topk=topk, student=student, tokenizer=tok,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, task=task, problems=problems,
        defense=public, sampling=cfg.decoding.under(public.params), cfg=cfg, seed=seed, objective=objective,
        holdout=holdout, load_model=load_model, over_api=over_api, budget=cfg.budget, samples_per_prompt=k,
        paraphrase=functools.partial(paraphrase_lines, task=task))


def _public_view(record: dict[str, Any]) -> dict[str, Any]:
    """A trace as the attacker received it: the referee's fields removed, a secret defense parameter as a digest."""
    view = attacker_view(record)
    if isinstance(view.get("params"), dict) and "defense" in view:
        view["params"] = public_params(view["defense"], view["params"])
    return view


def plan_attack(attacker: AttackerConfig, ctx: AttackContext, *, referee: Any | None = None) -> Plan:
    """The attacker's plan for one cell (its kind's planner from the table), checked; ``referee()`` -> the
    undefended teacher ``(model, tokenizer, path)``, used only to measure what replaced top-k rows recovered."""
    if attacker.spec.needs_logprobs or attacker.learns_from_teacher:
        reason = missing_logprobs(ctx.records, ctx.over_api)
        if reason is not None:
            return Plan.skip(f"{attacker.label} skipped: {reason}")
    t0 = time.perf_counter()
    plan = get_planner(attacker.kind)(ctx, attacker.p)
    plan.info.setdefault("plan_s", time.perf_counter() - t0)
    if plan.skipped:
        return plan
    n = ctx.n
    if n > ctx.budget:  # the context has no teacher handle: what it bought is all it can train on
        raise UserError(f"attacker {attacker.label} was given {n} traces for a budget of {ctx.budget} queries")
    if len(plan.keep) != len(plan.weights):
        raise UserError(f"attacker {attacker.label}: {len(plan.keep)} kept traces but {len(plan.weights)} weights")
    if not plan.keep or any(not 0 <= i < n for i in plan.keep) or len(set(plan.keep)) != len(plan.keep):
        raise UserError(f"attacker {attacker.label}: the plan must keep distinct traces among the {n} bought")
    if any(not (math.isfinite(w) and w >= 0) for w in plan.weights):
        raise UserError(f"attacker {attacker.label}: weights must be finite and >= 0")
    bad = sorted(set(plan.replace) - set(range(n)))
    if bad:
        raise UserError(f"attacker {attacker.label}: replacements of traces {bad[:5]} it never bought")
    plan.info.setdefault("n_queries", n)
    plan.info.setdefault("n_prompts", len({r["prompt"] for r in ctx.records}))
    if referee is not None and any(r.top is not None for r in plan.replace.values()):
        plan.info.update(recovered_kl(ctx, plan, referee, getattr(attacker.p, "target_temperature", 1.0)))
    return plan


def apply_plan(ctx: AttackContext, plan: Plan, tok) -> tuple[list[tuple[list[int], list[int]]], RevealedTopK | None]:
    """The encoded traces and top-k rows the student trains on: the bought ones with the plan's replacements."""
    enc = list(ctx.encoded)
    rows = list(ctx.topk.rows) if ctx.topk is not None else None
    for i, rep in plan.replace.items():
        if rep.encoded is not None:
            enc[i] = (list(rep.encoded[0]), list(rep.encoded[1]))
        elif rep.completion is not None:
            enc[i] = encode_example(tok, Example(prompt=ctx.records[i]["prompt"], completion=rep.completion))
        if rep.top is not None:
            if rows is None:
                raise UserError("a plan replaced top-k rows, but the attacker's objective learns from text")
            rows[i] = (torch.as_tensor(rep.top[0], dtype=torch.long),
                       torch.nan_to_num(torch.as_tensor(rep.top[1], dtype=torch.float32),
                                        neginf=REVEALED_FLOOR).clamp(min=REVEALED_FLOOR))
        elif rows is not None and (rep.encoded is not None or rep.completion is not None):
            raise UserError(f"trace {i} was replaced by new text without top-k rows, but the objective "
                            f"{ctx.objective} learns from top-k log-probs")
    return enc, (RevealedTopK(rows) if rows is not None else None)


def masked_kl(p_log: Tensor, q_log: Tensor, mask: Tensor) -> float:
    """Σ over rows of KL(p || q), both renormalised over each row's ``mask``ed entries."""
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    p = torch.log_softmax(torch.where(mask, p_log.double(), neg), -1)
    q = torch.log_softmax(torch.where(mask, q_log.double(), neg), -1)
    return float(torch.where(mask, p.exp() * (p - q), torch.zeros_like(p)).sum())


@torch.no_grad()
def recovered_kl(ctx: AttackContext, plan: Plan, referee: Any, temperature: float = 1.0) -> dict[str, float]:
    """The referee's check of recovered top-k rows: the mean over revealed positions of KL(teacher || rows), both
    renormalised over the position's revealed tokens that the defense did not exclude (a top-p truncation reveals
    ``-inf`` for some; positions with fewer than two such tokens are left out: every distribution on one token is
    the same), the teacher at ``temperature`` (1: its own distribution); the same for the rows as revealed, to
    compare."""
    model, _, _ = referee()
    device = next(model.parameters()).device
    kl_rec, kl_raw, n = 0.0, 0.0, 0
    for i, rep in plan.replace.items():
        if rep.top is None:
            continue
        r = ctx.records[i]
        ids = torch.as_tensor(rep.top[0], dtype=torch.long)
        rec = torch.as_tensor(rep.top[1], dtype=torch.float64)
        raw = torch.tensor(r["top_logprobs"], dtype=torch.float64)
        p_ids = ctx.tokenizer(r["prompt"])["input_ids"]
        seq = torch.tensor([p_ids + list(r["tokens"])], device=device)
        logits = model(input_ids=seq).logits[0, len(p_ids) - 1: len(p_ids) - 1 + len(r["tokens"])].double().cpu()
        teacher = torch.log_softmax(logits / temperature, -1).gather(-1, ids)
        mask = torch.isfinite(raw) & torch.isfinite(rec)
        ok = mask.sum(-1) >= 2
        if not ok.any():
            continue
        kl_rec += masked_kl(teacher[ok], rec[ok], mask[ok])
        kl_raw += masked_kl(teacher[ok], raw[ok], mask[ok])
        n += int(ok.sum())
    if not n:
        return {}
    return {"recovered_kl": kl_rec / n, "revealed_kl": kl_raw / n, "kl_positions": n}


def train_student(student: torch.nn.Module, traces: list, plan: Plan, topk: RevealedTopK | None,
                  attacker: AttackerConfig, cfg: GameConfig, *, seed: int, pad_id: int) -> torch.nn.Module:
    """Train ``student`` (in place) on the planned traces in the one loop; ``plan.reweigh`` is called every
    ``plan.reweigh.every`` steps with the student being trained and may change the kept traces' weights."""
    pool = [Encoded(traces[i][0], traces[i][1], w) for i, w in zip(plan.keep, plan.weights, strict=True)]
    objective = attacker.training_objective
    teacher: Any = TextTeacher()
    if get_objective(objective).uses_teacher:
        assert topk is not None
        teacher = RevealedTopK([topk.rows[i] for i in plan.keep])
    stages = [Stage(1, cfg.train.steps, objective, {})]
    accelerator = full_precision_accelerator()
    stream = DistillStream({"data": pool}, stages, batch_size=cfg.train.batch_size, grad_accum=1, seed=seed,
                           pad_id=pad_id)
    loss_fn = DistillLoss(teacher, stages, unwrap=accelerator.unwrap_model, seed=seed)
    reweigh = plan.reweigh
    on_eval = None
    every = 0
    if reweigh is not None and 0 < reweigh.every < cfg.train.steps:
        every = reweigh.every

        def on_eval(step: int) -> dict[str, Any]:
            new = reweigh(student, step)
            if new is not None:
                if len(new) != len(pool):
                    raise UserError(f"attacker {attacker.label}: reweighed {len(new)} traces, kept {len(pool)}")
                for e, w in zip(pool, new, strict=True):
                    e.weight = float(w)
                plan.weights = [float(w) for w in new]
            return {}

    loop = LoopConfig.from_settings(cfg.train, log_every=max(cfg.train.steps, 1), eval_every=every)
    torch.manual_seed(seed)
    return train(student, stream, loss_fn, loop, accelerator=accelerator, on_eval=on_eval)
