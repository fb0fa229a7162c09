"""Logit inversion from revealed top-k log-probs: undo what the attacker knows the defense did, then train on the
recovered rows (KD on the top-k; ``fkl`` by default).

A revealed row is ``s_j = log_softmax(m / tau)_j`` on the revealed tokens ``j`` (up to the renormalisation of a
top-p truncation, a constant per position), where ``m`` is what the defense sampled from:

* temperature (any defense's, or the game's decoding): ``m = z_T``, so ``z_T = tau * s + c``;
* PoE: ``m = (1 - gamma) z_T + gamma z_P`` with the proxy's logits ``z_P`` (a public model: the attacker runs it
  on the same prompt and tokens), so ``z_T = (tau * s - gamma * z_P) / (1 - gamma) + c``.

The constant ``c`` (per position) cancels when the recovered logits are renormalised over the revealed tokens:
``log_softmax(z_T / target_temperature)`` over them (the tail's shape is not revealed; the training signal's tail
bucket then holds almost nothing). Rounded or noisy reveals are amplified by ``tau / (1 - gamma)``.
``invert_temperature`` undoes the temperature only; ``invert_poe`` undoes the temperature and, in a PoE cell, the
proxy mix (elsewhere it is ``invert_temperature``). Neither undoes antidistillation's ``lam * b`` (that needs the
defender's holdout gradient) or a top-p truncation (excluded tokens stay excluded).

Threat model: it knows the defense's kind and the parameters the teacher sampled with (``ctx.sampling``), and
for PoE the proxy model (``ctx.defense.proxy``); it spends the same queries as passive.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distillarena.attacks.plan import AttackContext, Plan, Replacement
from distillarena.attacks.spec import InvertParams
from distillarena.core.errors import UserError


def invert_rows(s: Tensor, *, temperature: float, gamma: float = 0.0, proxy: Tensor | None = None,
                target_temperature: float = 1.0) -> Tensor:
    """Recovered log-probs (float64 ``[T, k]``, renormalised over each row's revealed tokens) from revealed rows
    ``s`` (``[T, k]``, ``-inf`` for excluded tokens) and, for PoE, the proxy's logits on the same tokens."""
    if not 0.0 <= gamma < 1.0:
        raise UserError(f"cannot invert PoE at gamma {gamma}: at gamma 1 the teacher's logits are gone")
    s = s.double()
    z = temperature * s
    if gamma > 0:
        if proxy is None:
            raise UserError("PoE inversion needs the proxy's logits")
        z = (z - gamma * proxy.double()) / (1.0 - gamma)
    z = torch.where(torch.isfinite(s), z / target_temperature, torch.full_like(z, float("-inf")))
    out = torch.log_softmax(z, dim=-1)
    return torch.where(torch.isfinite(s), out, torch.full_like(out, float("-inf")))


@torch.no_grad()
def completion_logits(model: torch.nn.Module, tokenizer, prompt: str, tokens: list[int]) -> Tensor:
    """The model's logits ``[T, V]`` predicting each of ``tokens`` after ``prompt`` (float32, on the CPU)."""
    device = next(model.parameters()).device
    p_ids = tokenizer(prompt)["input_ids"]
    seq = torch.tensor([p_ids + list(tokens)], device=device)
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0]
    return logits[len(p_ids) - 1: len(p_ids) - 1 + len(tokens)].float().cpu()


def _plan(ctx: AttackContext, p: InvertParams, *, poe: bool) -> Plan:
    tau = float(ctx.sampling.get("temperature", 1.0))
    gamma = float(ctx.sampling.get("gamma", 0.0)) if (poe and ctx.defense.kind == "poe") else 0.0
    if gamma >= 1.0:
        return Plan.skip(f"PoE at gamma {gamma:g} leaves nothing of the teacher to invert")
    proxy = None
    if gamma > 0:
        proxy, proxy_tok = ctx.load_model(ctx.defense.proxy)
        proxy.eval()
        if len(proxy_tok) != len(ctx.tokenizer):
            raise UserError("invert_poe: the proxy's vocabulary differs from the teacher's tokenizer")
    replace: dict[int, Replacement] = {}
    for i, r in enumerate(ctx.records):
        ids = torch.tensor(r["top_ids"], dtype=torch.long)
        s = torch.tensor(r["top_logprobs"], dtype=torch.float64)
        zp = None
        if proxy is not None:
            zp = completion_logits(proxy, ctx.tokenizer, r["prompt"], r["tokens"]).gather(-1, ids)
        rec = invert_rows(s, temperature=tau, gamma=gamma, proxy=zp, target_temperature=p.target_temperature)
        replace[i] = Replacement(top=(ids, rec.float()))
    inverted: dict[str, Any] = {"temperature": tau}
    if gamma > 0:
        inverted["gamma"] = gamma
    return Plan.uniform(list(range(ctx.n)), replace=replace,
                        info={"inverted": inverted, "target_temperature": p.target_temperature,
                              "proxy_forwards": ctx.n if proxy is not None else 0})


def plan_temperature(ctx: AttackContext, p: InvertParams) -> Plan:
    return _plan(ctx, p, poe=False)


def plan_poe(ctx: AttackContext, p: InvertParams) -> Plan:
    return _plan(ctx, p, poe=True)
