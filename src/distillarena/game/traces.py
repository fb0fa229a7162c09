"""``distillarena traces``: sample a (defended) teacher on task prompts into a resumable JSON lines file.

Batches are fixed by position in the prompt list and each is sampled with its own generator seeded from
``(seed, batch index)``, so a run resumed after a crash writes exactly the traces an uninterrupted run would
have written, and never writes one twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distillarena.core.io import JsonlWriter, cache_dir, read_jsonl, repair_jsonl
from distillarena.defenses.antidistillation import compute_proxy_gradient, load_proxy_gradient
from distillarena.defenses.policy import DecodingPolicy, build_policy
from distillarena.defenses.reveal import RevealTopK
from distillarena.defenses.rewrite import fit_tokens
from distillarena.defenses.spec import DEFENSES
from distillarena.game.config import DecodingConfig, DefenseConfig, TracesConfig
from distillarena.models.fingerprint import model_fingerprint
from distillarena.models.tokenizer import left_padding
from distillarena.tasks.base import Task, TaskProblem
from distillarena.tasks.data import Example, collate, encode_example, problem_example
from distillarena.train.teacher import model_task, resolve_model


def holdout_gradient(proxy: torch.nn.Module, tokenizer, n_traces: int, task: Task, console: Console, *,
                     teacher: torch.nn.Module | None = None, decoding: dict[str, Any] | None = None):
    """The proxy's holdout-loss gradient for antidistillation sampling, computed once and cached on disk. Its
    holdout texts are the undefended ``teacher``'s own completions of holdout prompts (sampled at ``decoding``, with
    a fixed seed), as in the papers, or, without a teacher, the task's reference solutions. (The teacher and the
    proxy share the tokenizer: PoE and antidistillation check it.)"""
    problems = task.problems("holdout", n_traces, [1, 2, 3, 4], seed=0)
    source = "reference"
    if teacher is not None:
        source = f"teacher-{model_fingerprint(teacher)[:16]}-{json.dumps(decoding or {}, sort_keys=True)}"
    data_key = hashlib.sha256("\n".join([source] + [p.expression for p in problems]).encode()).hexdigest()[:12]
    if teacher is None:  # (the key of the reference-solution holdout is the one it always had)
        data_key = hashlib.sha256("\n".join(p.expression for p in problems).encode()).hexdigest()[:12]
    path = cache_dir() / "proxy_gradients" / f"{model_fingerprint(proxy)[:16]}-{data_key}.safetensors"
    if path.exists():
        return load_proxy_gradient(path, proxy, tokenizer=tokenizer)
    what = "the teacher's completions of" if teacher is not None else "reference solutions of"
    console.print(f"computing the proxy's holdout gradient on {what} {n_traces} holdout problems (cached at {path})")
    if teacher is not None:
        completions = _teacher_completions(teacher, tokenizer, [p.prompt for p in problems], decoding or {})
        enc = [encode_example(tokenizer, Example(prompt=p.prompt, completion=c))
               for p, c in zip(problems, completions, strict=True)]
    else:
        enc = [encode_example(tokenizer, problem_example(p)) for p in problems]
    batches = [collate(enc[i : i + 64], tokenizer.pad_token_id) for i in range(0, len(enc), 64)]
    return compute_proxy_gradient(proxy, batches, path=path, tokenizer=tokenizer)


@torch.no_grad()
def _teacher_completions(teacher: torch.nn.Module, tokenizer, prompts: list[str], decoding: dict[str, Any],
                         batch_size: int = 64, max_new_tokens: int = 64) -> list[str]:
    policy = build_policy("none", decoding)
    gen = torch.Generator().manual_seed(0)
    out: list[str] = []
    with left_padding(tokenizer):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            res = policy.sample(teacher, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                generator=gen, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
            out.extend(res.texts(tokenizer))
    return out


def defense_gradient(cfg: DefenseConfig, proxy: torch.nn.Module, proxy_tok, task: Task, console: Console,
                     teacher: torch.nn.Module | None, decoding: DecodingConfig | None):
    """The holdout gradient a defense config asks for (``holdout: teacher`` or ``reference``)."""
    use_teacher = cfg.holdout == "teacher" and teacher is not None
    return holdout_gradient(proxy, proxy_tok, cfg.holdout_traces, task, console,
                            teacher=teacher if use_teacher else None,
                            decoding=decoding.params() if (use_teacher and decoding is not None) else None)


def build_defense(cfg: DefenseConfig, teacher: torch.nn.Module, tokenizer, task: Task,
                  console: Console, decoding: DecodingConfig | None = None) -> DecodingPolicy:
    """The defense's sampling policy, its parameters laid over the teacher's ``decoding``."""
    proxy = proxy_tok = gradient = None
    spec = DEFENSES[cfg.kind]
    if spec.needs_proxy:
        proxy, proxy_tok, _ = resolve_model(cfg.proxy, console)
        if spec.needs_gradient:
            gradient = defense_gradient(cfg, proxy, proxy_tok, task, console, teacher, decoding)
    params = decoding.under(cfg.params) if decoding is not None else cfg.params
    return build_policy(cfg.kind, params, teacher=teacher, tokenizer=tokenizer, proxy=proxy,
                        proxy_tokenizer=proxy_tok, gradient=gradient, task=task)


def trace_record(index: int, problem: TaskProblem, task: Task, completion: str, tokens: list[int],
                 logprobs: list[float] | None, teacher_logprobs: list[float] | None, kl_to_undefended: float | None,
                 *, top: tuple[list, list] | None, defense: str, params: dict[str, Any], seed: int, batch: int,
                 teacher: str) -> dict[str, Any]:
    """One line of a traces file, sampled in process or collected over HTTP (what an API cannot reveal is None):
    the problem and how the task scores the completion, the sampled tokens and their log-probs, where it came from,
    and the revealed top-k rows (ids, log-probs) if any."""
    rec = {"index": index, "prompt": problem.prompt, "completion": completion, "answer": problem.answer,
           "n_ops": problem.difficulty, "correct": task.check(problem, completion),
           "step_validity": task.step_validity(completion), "tokens": tokens, "logprobs": logprobs,
           "teacher_logprobs": teacher_logprobs, "kl_to_undefended": kl_to_undefended, "defense": defense,
           "params": params, "seed": seed, "batch": batch, "teacher": teacher}
    if top is not None:
        rec["top_ids"], rec["top_logprobs"] = top
    return rec


def rewritten_record(index: int, problem: TaskProblem, task: Task, teacher_text: str, rewritten, tok, *,
                     ended: bool, max_tokens: int, defense: str, params: dict[str, Any], seed: int, batch: int,
                     teacher: str) -> dict[str, Any]:
    """The trace record of an output-level defense: the rewritten text and its tokens as the tokenizer reads it,
    within ``max_tokens`` (and the EOS if the teacher stopped: :func:`~distillarena.defenses.rewrite.fit_tokens`,
    as the server reveals it), no log-probs, top-k or KL (none of the rewritten text is the teacher's); the
    teacher's own text and the rewrite's marks (e.g. ``poisoned``) kept beside it."""
    text, tokens, _ = fit_tokens(rewritten.text, tok, max_tokens, tok.eos_token_id, ended=ended)
    rec = trace_record(index, problem, task, text, tokens, None, None, None, top=None, defense=defense,
                       params=params, seed=seed, batch=batch, teacher=teacher)
    rec["teacher_completion"] = teacher_text
    rec.update(rewritten.marks)
    return rec


def batch_seed(seed: int, batch: int) -> int:
    """The generator seed of batch ``batch`` (shared with the game's collection over HTTP, which sends it)."""
    return seed * 1_000_003 + batch


def run_traces(cfg: TracesConfig, out: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    out = Path(out)
    teacher, tok, teacher_path = resolve_model(cfg.teacher, console)
    task = model_task(cfg.teacher)
    policy = build_defense(cfg.defense, teacher, tok, task, console, cfg.decoding)
    reveal = RevealTopK(cfg.reveal.top_k, decimals=cfg.reveal.decimals, noise_std=cfg.reveal.noise_std,
                        seed=cfg.seed) if cfg.reveal.top_k and not policy.rewrites_text else None
    if cfg.reveal.top_k and policy.rewrites_text:
        console.print(f"defense {policy.kind} rewrites the teacher's text: the traces reveal the text alone, no "
                      "top-k log-probs (reveal.top_k is ignored)")
    problems = task.problems(cfg.prompts.split, cfg.prompts.n, cfg.prompts.n_ops, seed=cfg.prompts.seed)
    problems = [p for p in problems for _ in range(cfg.prompts.samples)]  # k samples per prompt, consecutive

    repair_jsonl(out)
    done = {r["index"] for r in read_jsonl(out)} if out.exists() else set()
    if done:
        console.print(f"resuming: {len(done)} of {len(problems)} traces already in {out}")
    n_new = n_tokens = 0
    t0 = time.perf_counter()
    with JsonlWriter(out) as writer, left_padding(tok):
        for b, start in enumerate(range(0, len(problems), cfg.batch_size)):
            idx = list(range(start, min(start + cfg.batch_size, len(problems))))
            if all(i in done for i in idx):
                continue
            enc = tok([problems[i].prompt for i in idx], return_tensors="pt", padding=True)
            gen = torch.Generator().manual_seed(batch_seed(cfg.seed, b))
            res = policy.sample(teacher, enc["input_ids"], enc["attention_mask"],
                                max_new_tokens=cfg.max_new_tokens, generator=gen, reveal=reveal,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            texts = res.texts(tok)
            rewritten = (policy.rewrite([problems[i].prompt for i in idx], texts, seed=batch_seed(cfg.seed, b))
                         if policy.rewrite is not None else None)
            for row, i in enumerate(idx):
                if i in done:
                    continue
                n = int(res.lengths[row])
                p = problems[i]
                if rewritten is not None:  # output-level: the rewritten text alone is revealed
                    ended = n > 0 and int(res.tokens[row, n - 1]) == tok.eos_token_id
                    rec = rewritten_record(i, p, task, texts[row], rewritten[row], tok, ended=ended,
                                           max_tokens=cfg.max_new_tokens, defense=policy.kind,
                                           params=dict(cfg.defense.params), seed=cfg.seed, batch=b,
                                           teacher=str(teacher_path))
                    writer.write(rec)
                    n_new += 1
                    n_tokens += n
                    continue
                top = None
                if res.top_ids is not None:
                    top_lps = res.top_logprobs[row, :n].tolist()
                    if cfg.reveal.decimals is not None:  # float32 -> float64 would show 1.2300000190734863
                        top_lps = [[round(v, cfg.reveal.decimals) for v in r] for r in top_lps]
                    top = (res.top_ids[row, :n].tolist(), top_lps)
                rec = trace_record(i, p, task, texts[row], res.tokens[row, :n].tolist(),
                                   res.logprobs[row, :n].tolist(), res.teacher_logprobs[row, :n].tolist(),
                                   float(res.kl[row, :n].sum()) / max(n, 1), top=top, defense=policy.kind,
                                   params=dict(cfg.defense.params), seed=cfg.seed, batch=b,
                                   teacher=str(teacher_path))
                writer.write(rec)
                n_new += 1
                n_tokens += n
    seconds = time.perf_counter() - t0
    records = read_jsonl(out)
    kl_known = all(r["kl_to_undefended"] is not None for r in records)
    summary = {
        "traces": len(records), "new": n_new, "defense": cfg.defense.label, "decoding": cfg.decoding.params(),
        "accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
        "kl_to_undefended": sum(r["kl_to_undefended"] for r in records) / max(len(records), 1) if kl_known else None,
        "tokens_per_s": n_tokens / seconds if n_new else None,
    }
    kl = (f"mean KL to undefended {summary['kl_to_undefended']:.3f}" if kl_known
          else "KL to undefended undefined (the text is rewritten)")
    console.print(f"[green]{len(records)} traces[/] in {out} ({n_new} new): defense {cfg.defense.label}, "
                  f"accuracy {summary['accuracy']:.1%}, {kl}")
    return summary
