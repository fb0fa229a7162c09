"""Trace collection: the attacker queries a (defended) teacher on the first ``budget`` prompts of its pool and
keeps what the teacher reveals (text; per-token log-probs and top-k if the reveal policy gives them).

Sampling goes through :func:`distillarena.recipes.traces.run_traces` (resumable JSON lines, seeded per batch);
a finished collection is a folder written in one rename: ``traces.jsonl`` and ``meta.json`` (teacher utility
on these queries and its cost).

**Answer forcing** (``answer_forcing: true``, as in the reference code): a trace with no ``Answer:`` line gets
one, completed greedily by the *undefended* teacher. This flatters the defense (its traces and its measured
accuracy borrow the undefended teacher's answer); the forced accuracy is reported separately, labelled so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..config import DefenseConfig, GameConfig, PromptsConfig, TeacherConfig, TracesConfig
from ..decoding import sample
from ..paths import atomic_dir, atomic_write_json, read_jsonl
from ..recipes.teach import task_config
from ..recipes.traces import holdout_gradient, resolve_model, run_traces
from ..tasks.arithmetic import ANSWER_PREFIX, ArithmeticTask, check_answer, extract_answer

META = "meta.json"
TRACES = "traces.jsonl"


def proxy_forwards_per_token(defense: DefenseConfig) -> int:
    """Proxy forward passes per generated token: PoE one; antidistillation two (finite differences: the two
    perturbed copies) or one forward-mode pass (``method: jvp``); the rest none."""
    if defense.kind == "poe":
        return 1
    if defense.kind == "antidistillation":
        return 1 if defense.params.get("method", "fd") == "jvp" else 2
    return 0


def traces_config(cfg: GameConfig, defense: DefenseConfig, seed: int) -> TracesConfig:
    return TracesConfig(teacher=cfg.teacher, defense=defense,
                        prompts=PromptsConfig(split="train", n=cfg.budget, n_ops=cfg.prompts.n_ops,
                                              seed=cfg.prompts.seed),
                        reveal=cfg.reveal, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed)


def game_task(cfg: GameConfig) -> ArithmeticTask:
    return ArithmeticTask(task_config(cfg.teacher.teach or TeacherConfig()))


@torch.no_grad()
def force_answers(teacher: torch.nn.Module, tok, records: list[dict[str, Any]], max_new_tokens: int = 8,
                  batch_size: int = 64) -> None:
    """Give every record without an ``Answer:`` line one, completed greedily by the undefended ``teacher``
    (in place: ``forced_completion``, ``forced``)."""
    todo = [r for r in records if extract_answer(r["completion"]) is None]
    for r in records:
        r["forced"] = False
        r["forced_completion"] = r["completion"]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            heads = [r["completion"] + ("" if not r["completion"] or r["completion"].endswith("\n") else "\n")
                     + ANSWER_PREFIX for r in chunk]
            enc = tok([r["prompt"] + h for r, h in zip(chunk, heads, strict=True)], return_tensors="pt",
                      padding=True)
            res = sample(teacher, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                         temperature=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for r, h, tail in zip(chunk, heads, res.texts(tok), strict=True):
                r["forced"] = True
                r["forced_completion"] = h + tail.split("\n")[0]
    finally:
        tok.padding_side = side


def collect(cfg: GameConfig, defense: DefenseConfig, seed: int, folder: Path, console: Console) -> dict[str, Any]:
    """The traces of one (defense, strength, seed): reuse ``folder`` if finished, else sample (resumable)."""
    folder = Path(folder)
    if (folder / META).is_file():
        return json.loads((folder / META).read_text())
    raw = folder.parent / f".{folder.name}.raw.jsonl"
    offline_s = 0.0
    if defense.kind == "antidistillation":  # the one offline cost: the proxy's holdout gradient (cached on disk)
        proxy, proxy_tok, _ = resolve_model(defense.proxy, console)
        grad = holdout_gradient(proxy, proxy_tok, defense.holdout_traces, game_task(cfg), console)
        offline_s = float(grad.metadata.get("seconds", 0.0))
    t0 = time.perf_counter()
    summary = run_traces(traces_config(cfg, defense, seed), raw, console=console)
    wall = time.perf_counter() - t0
    records = sorted(read_jsonl(raw), key=lambda r: r["index"])
    problems = {i: p for i, p in enumerate(game_task(cfg).problems("train", cfg.budget, cfg.prompts.n_ops,
                                                                   seed=cfg.prompts.seed))}
    if cfg.answer_forcing:
        teacher, tok, _ = resolve_model(cfg.teacher, console)
        force_answers(teacher, tok, records)
    n_tok = sum(len(r["tokens"]) for r in records)
    meta = {
        "defense": defense.kind, "params": dict(defense.params), "seed": seed, "traces": len(records),
        "teacher_accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
        "teacher_step_validity": sum(r["step_validity"] for r in records) / max(len(records), 1),
        "teacher_kl": sum(r["kl_to_undefended"] * len(r["tokens"]) for r in records) / max(n_tok, 1),
        "teacher_tokens_per_s": summary.get("tokens_per_s"),
        "teacher_tokens": n_tok, "sampling_wall_s": wall,
        "proxy_forwards_per_token": proxy_forwards_per_token(defense), "offline_s": offline_s,
        "answer_forcing": cfg.answer_forcing,
    }
    if cfg.answer_forcing:
        meta["teacher_accuracy_forced"] = sum(check_answer(problems[r["index"]], r["forced_completion"])
                                              for r in records) / max(len(records), 1)
        meta["forced_fraction"] = sum(r["forced"] for r in records) / max(len(records), 1)
    with atomic_dir(folder) as tmp:
        (tmp / TRACES).write_text("".join(json.dumps(r) + "\n" for r in records))
        atomic_write_json(tmp / META, meta)
    raw.unlink(missing_ok=True)
    return meta


def load_traces(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(folder) / TRACES)
