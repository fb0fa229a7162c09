"""Trace collection: the attacker queries a (defended) teacher on the first ``budget`` prompts of its pool and
keeps what the teacher reveals (text; per-token log-probs and top-k if the reveal policy gives them).

Sampling goes through :func:`distillarena.game.traces.run_traces` (resumable JSON lines, seeded per batch);
a finished collection is a folder written in one rename: ``traces.jsonl`` and ``meta.json`` (teacher utility
on these queries and its cost).

**Over HTTP** (``api`` in the game config, :class:`~distillarena.game.config.GameAPI`): the same batches are asked of a
served teacher through :class:`~distillarena.teachers.APITeacher` (resumable too), one ``/v1/completions`` request
per batch with the prompts as token ids and the batch's seed, with the key whose policy is the cell's defense. The
server then makes the very sampler call ``run_traces`` makes (same rows, same padding, same generator seed, the
defense built by the same ``build_policy``), so the traces are identical: text, token ids (the EOS included) and
revealed top-k, and the sampled token's log-prob when the key neither rounds nor adds noise. Exact equality needs
the same batches: a sampled token depends on the rows it was sampled with (one generator draws for the whole
batch, and padding changes the floating-point sums), so one request per prompt with per-prompt seeds could not
reproduce an in-process batch. What an API does not reveal stays unknown: the undefended teacher's log-probs of
the sampled tokens, hence the KL to the undefended teacher (``teacher_kl`` is null).

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

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json, read_jsonl
from distillarena.decoding import sample
from distillarena.defenses.spec import DEFENSES
from distillarena.game.config import DefenseConfig, GameConfig, PromptsConfig, TracesConfig
from distillarena.game.traces import batch_seed, defense_gradient, run_traces, trace_record
from distillarena.game.utility import utility_meta
from distillarena.models.tokenizer import left_padding
from distillarena.tasks.base import Task
from distillarena.train.teacher import model_path, model_task, resolve_model

META = "meta.json"
TRACES = "traces.jsonl"


def traces_config(cfg: GameConfig, defense: DefenseConfig, seed: int, samples_per_prompt: int = 1) -> TracesConfig:
    return TracesConfig(teacher=cfg.teacher, defense=defense,
                        prompts=PromptsConfig(split="train", n=cfg.budget // samples_per_prompt,
                                              n_ops=cfg.prompts.n_ops, seed=cfg.prompts.seed,
                                              samples=samples_per_prompt),
                        reveal=cfg.reveal, decoding=cfg.decoding, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size, seed=seed)


def game_task(cfg: GameConfig) -> Task:
    return model_task(cfg.teacher)


@torch.no_grad()
def force_answers(teacher: torch.nn.Module, tok, records: list[dict[str, Any]], task: Task, max_new_tokens: int = 8,
                  batch_size: int = 64) -> None:
    """Give every record without a final answer one (the task's answer prefix), completed greedily by the
    undefended ``teacher`` (in place: ``forced_completion``, ``forced``)."""
    todo = [r for r in records if task.extract_answer(r["completion"]) is None]
    for r in records:
        r["forced"] = False
        r["forced_completion"] = r["completion"]
    with left_padding(tok):
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            heads = [r["completion"] + ("" if not r["completion"] or r["completion"].endswith("\n") else "\n")
                     + task.answer_prefix for r in chunk]
            enc = tok([r["prompt"] + h for r, h in zip(chunk, heads, strict=True)], return_tensors="pt",
                      padding=True)
            res = sample(teacher, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                         temperature=0.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for r, h, tail in zip(chunk, heads, res.texts(tok), strict=True):
                r["forced"] = True
                r["forced_completion"] = h + tail.split("\n")[0]


def queried_problems(cfg: GameConfig, task: Task, samples_per_prompt: int = 1) -> list:
    """The problem of each query: the first ``budget // k`` prompts of the pool, each asked ``k`` times in a row."""
    k = samples_per_prompt
    return [p for p in task.problems("train", cfg.budget // k, cfg.prompts.n_ops, seed=cfg.prompts.seed)
            for _ in range(k)]


def collect(cfg: GameConfig, defense: DefenseConfig, seed: int, folder: Path, console: Console,
            samples_per_prompt: int = 1) -> dict[str, Any]:
    """The traces of one (defense, strength, seed): reuse ``folder`` if finished, else sample (resumable). With
    ``samples_per_prompt`` k > 1: k completions of each of the first ``budget // k`` prompts (same query budget)."""
    folder = Path(folder)
    if (folder / META).is_file():
        return json.loads((folder / META).read_text())
    raw = folder.parent / f".{folder.name}.raw.jsonl"
    offline_s = 0.0
    lam_scales: dict[str, float] = {}
    if DEFENSES[defense.kind].needs_gradient and cfg.api is None:  # the one offline cost: the proxy's holdout
        proxy, proxy_tok, _ = resolve_model(defense.proxy, console)  # gradient (cached on disk)
        teacher_model = resolve_model(cfg.teacher, console)[0] if defense.holdout == "teacher" else None
        grad = defense_gradient(defense, proxy, proxy_tok, game_task(cfg), console, teacher_model, cfg.decoding)
        offline_s = float(grad.metadata.get("seconds", 0.0))
        # lambda as given, and in the papers' scale: they add lambda * (the change along the raw gradient), here
        # the direction is the unit gradient unless normalize is none, so lambda_raw = lambda / ||g||
        lam = float(cfg.decoding.under(defense.params).get("lam", 0.0))
        unit = cfg.decoding.under(defense.params).get("normalize", "unit") == "unit"
        lam_scales = {"lam": lam, "lam_unnormalised": lam / grad.norm if unit and grad.norm > 0 else lam,
                      "holdout_gradient_norm": float(grad.norm)}
    t0 = time.perf_counter()
    if cfg.api is not None:
        summary = api_traces(cfg, defense, seed, raw, console, samples_per_prompt)
    else:
        summary = run_traces(traces_config(cfg, defense, seed, samples_per_prompt), raw, console=console)
    wall = time.perf_counter() - t0
    records = sorted(read_jsonl(raw), key=lambda r: r["index"])
    task = game_task(cfg)
    problems = dict(enumerate(queried_problems(cfg, task, samples_per_prompt)))
    if cfg.answer_forcing:
        teacher, tok, _ = resolve_model(cfg.teacher, console)
        force_answers(teacher, tok, records, task)
    n_tok = sum(len(r["tokens"]) for r in records)
    kl_known = all(r["kl_to_undefended"] is not None for r in records)
    meta = {
        "defense": defense.kind, "params": dict(defense.params), "seed": seed, "traces": len(records),
        "teacher_accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
        "teacher_step_validity": sum(r["step_validity"] for r in records) / max(len(records), 1),
        "teacher_kl": sum(r["kl_to_undefended"] * len(r["tokens"]) for r in records) / max(n_tok, 1)
        if kl_known else None,
        "teacher_tokens_per_s": summary.get("tokens_per_s"),
        "teacher_tokens": n_tok, "sampling_wall_s": wall,
        "proxy_forwards_per_token": DEFENSES[defense.kind].proxy_forwards_per_token(defense.params),
        "offline_s": offline_s, **lam_scales,
        "answer_forcing": cfg.answer_forcing,
        # per trace, in prompt order (the same prompts for every defense of a seed): paired teacher-utility intervals
        "trace_correct": "".join("1" if r["correct"] else "0" for r in records),
        "trace_step_validity": [round(float(r["step_validity"]), 4) for r in records],
    }
    meta.update(utility_meta(records, task))  # what a user who reads the reasoning gets (game/utility.py)
    if cfg.api is not None:
        meta["teacher_api"] = f"{cfg.api.model} at {cfg.api.base_url}"
    if cfg.answer_forcing:
        meta["teacher_accuracy_forced"] = sum(task.check(problems[r["index"]], r["forced_completion"])
                                              for r in records) / max(len(records), 1)
        meta["forced_fraction"] = sum(r["forced"] for r in records) / max(len(records), 1)
    with atomic_dir(folder) as tmp:
        (tmp / TRACES).write_text("".join(json.dumps(r) + "\n" for r in records))
        atomic_write_json(tmp / META, meta)
    raw.unlink(missing_ok=True)
    for p in _api_files(raw):
        p.unlink(missing_ok=True)
    return meta


# --------------------------------------------------------------------------------------------------------------
# Over HTTP
# --------------------------------------------------------------------------------------------------------------


def _api_files(raw: Path) -> tuple[Path, Path]:
    """The API teacher's own resumable answers (one line per batch) and its file of refused requests."""
    answers = raw.with_name(raw.name.replace(".raw.jsonl", ".api.jsonl"))
    return answers, answers.with_name(answers.name + ".errors.jsonl")


def teacher_tokenizer(cfg: GameConfig, console: Console):
    """The tokenizer of the game's (local copy of the) teacher."""
    from distillarena.models.presets import load_tokenizer

    return load_tokenizer(str(model_path(cfg.teacher, console)))


def _token_id(name: str) -> int:
    head, _, tail = name.partition(":")
    if head != "token_id" or not tail.lstrip("-").isdigit():
        raise UserError(f"the API returned token {name!r} where a token id was asked for "
                        "(return_tokens_as_token_ids): it does not support the extension; set api.token_ids: false")
    return int(tail)


def _revealed(v: float) -> float:
    return float("-inf") if v <= -9999.0 else float(v)  # OpenAI's -9999: a token the distribution excludes


def api_traces(cfg: GameConfig, defense: DefenseConfig, seed: int, out: Path, console: Console,
               samples_per_prompt: int = 1) -> dict[str, Any]:
    """Ask the batches of ``run_traces`` (same prompts, same batches, same seeds) of the served teacher whose key
    applies ``defense``, and write trace records as ``run_traces`` writes them to ``out``. Resumable: the answers
    are kept, one line per batch, next to ``out`` until the collection is finished."""
    from distillarena.teachers.api_client import APITeacher

    api = cfg.api
    assert api is not None
    key = api.key_for(defense.kind, cfg.decoding.under(defense.params))
    tok = teacher_tokenizer(cfg, console)
    task = game_task(cfg)
    problems = queried_problems(cfg, task, samples_per_prompt)
    batches = [list(range(s, min(s + cfg.batch_size, len(problems)))) for s in range(0, len(problems), cfg.batch_size)]
    items = [{"id": str(b), "prompt": [tok(problems[i].prompt)["input_ids"] for i in idx], "seed": batch_seed(seed, b)}
             for b, idx in enumerate(batches)]
    # an output-level defense's key reveals the rewritten text alone (no log-probs, hence no token ids): text only
    token_ids = api.token_ids and DEFENSES[defense.kind].reveals_logprobs
    if token_ids:
        top_logprobs = (cfg.reveal.top_k or 0) if key.reveals_logprobs else 0
    else:
        top_logprobs = None
    teacher = APITeacher(base_url=api.base_url, api_key=key.token(), model=api.model, chat=False,
                         max_tokens=cfg.max_new_tokens, temperature=1.0, n=1, top_logprobs=top_logprobs,
                         concurrency=api.concurrency, max_retries=api.max_retries, timeout=api.timeout,
                         extra_body={"return_tokens_as_token_ids": True} if token_ids else None)
    answers, errors = _api_files(out)
    t0 = time.perf_counter()
    done = teacher.collect(items, answers)
    seconds = time.perf_counter() - t0
    where = f"{api.model} at {api.base_url}"
    if done.stopped:
        raise UserError(f"collecting traces of {defense.kind} from {where} stopped: {done.stopped}. The answers so "
                        f"far are kept in {answers}: run the game again to resume")
    if done.failed:
        first = json.loads(errors.read_text().splitlines()[-done.failed])
        hint = (" (every batch of batch_size prompts is one request: raise the server's max_prompts or lower "
                "batch_size)" if "prompts in one request" in first["error"] else "")
        raise UserError(f"{where} refused {done.failed} of {len(items)} batches of {defense.kind} traces: "
                        f"{first['error']}{hint}")
    by_batch = {int(r["id"]): r for r in read_jsonl(answers)}
    eos = {tok.eos_token_id}
    records = []
    for b, idx in enumerate(batches):
        answer = by_batch[b]
        if len(answer["choices"]) != len(idx):
            raise UserError(f"{where} answered {len(answer['choices'])} completions for {len(idx)} prompts")
        for i, ch in zip(idx, answer["choices"], strict=True):
            p, text = problems[i], ch["text"]
            if token_ids:
                tokens = [_token_id(t) for t in ch["tokens"]]
                logprobs = [_revealed(v) for v in ch["token_logprobs"]]
            else:  # text only: the tokens as the local tokenizer reads the text (and the EOS it stopped on)
                tokens = tok(text, add_special_tokens=False)["input_ids"] + \
                    (sorted(eos) if ch["finish_reason"] == "stop" and None not in eos else [])
                logprobs = None
            top = None
            if token_ids and cfg.reveal.top_k and key.reveals_logprobs:
                top = ([[_token_id(t) for t, _ in row] for row in ch["top_logprobs"]],
                       [[_revealed(v) for _, v in row] for row in ch["top_logprobs"]])
            records.append(trace_record(i, p, task, text, tokens, logprobs, None, None, top=top,
                                        defense=defense.kind, params=dict(defense.params), seed=seed, batch=b,
                                        teacher=where))
    with open(out, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    console.print(f"[green]{len(records)} traces[/] from {where} ({done.written} of {len(items)} batches asked now): "
                  f"defense {defense.kind}{defense.params or ''}, accuracy {accuracy:.1%}")
    n_tokens = sum(len(r["tokens"]) for r in records)
    return {"traces": len(records), "new": done.written, "accuracy": accuracy,  # throughput: only if all asked now
            "tokens_per_s": n_tokens / seconds if done.written == len(items) and seconds > 0 else None}


def load_traces(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(folder) / TRACES)
