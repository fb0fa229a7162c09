"""``distillarena teach``: train a teacher preset on the built-in task, cached by the hash of its config."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distillarena.core.io import atomic_dir, atomic_write_json, cache_dir
from distillarena.core.progress import progress
from distillarena.evaluate.task_eval import evaluate_problems
from distillarena.models.presets import build_preset, count_parameters, load_model, load_tokenizer
from distillarena.models.tokenizer import task_tokenizer
from distillarena.tasks.arithmetic import ArithmeticTask
from distillarena.tasks.data import arithmetic_stream, collate, encode_example
from distillarena.train.config import ModelRef, TeacherConfig
from distillarena.train.loop import LoopConfig, StepLog, causal_lm_loss_sum, train

INFO_FILE = "distillarena_teacher.json"
LOG_FILE = "train_log.jsonl"
PROBE_DIFFICULTY = 2  # the difficulty whose held-out accuracy is tracked during training
PROBE_SIZE = 200


@dataclass
class TeacherResult:
    path: Path
    cached: bool
    info: dict[str, Any]

    @property
    def log(self) -> list[dict[str, Any]]:
        f = self.path / LOG_FILE
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def tokenizer_id() -> str:
    return Path(task_tokenizer().name_or_path).name


def teacher_dir(cfg: TeacherConfig) -> Path:
    return cache_dir() / "teachers" / f"{cfg.preset}-{cfg.cache_key(tokenizer_id())}"


def teach(cfg: TeacherConfig, *, force: bool = False, console: Console | None = None) -> TeacherResult:
    """Train (or reuse) the teacher for ``cfg``; the folder loads with ``from_pretrained`` alone."""
    console = console or Console()
    path = teacher_dir(cfg)
    if (path / INFO_FILE).exists() and not force:
        info = json.loads((path / INFO_FILE).read_text())
        console.print(f"[green]reusing cached teacher[/] {path} "
                      f"(trained in {info['train_seconds']:.0f}s, {PROBE_DIFFICULTY}-op accuracy "
                      f"{info['probe_accuracy']:.1%})")
        return TeacherResult(path, True, info)

    torch.manual_seed(cfg.train.seed)
    tok = task_tokenizer()
    model = build_preset(cfg.preset, tok, seed=cfg.train.seed)
    acfg = cfg.task.arithmetic()
    stream = arithmetic_stream(cfg.task.n_ops, cfg.train.seed, acfg)
    bs = cfg.train.batch_size

    def batches():
        while True:
            exs = list(itertools.islice(stream, bs))
            yield collate([encode_example(tok, e) for e in exs], tok.pad_token_id)

    probe = ArithmeticTask(acfg).problems("holdout", PROBE_SIZE, PROBE_DIFFICULTY, seed=cfg.train.seed)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    eval_seconds = 0.0

    def probe_accuracy(step: int) -> dict[str, Any]:
        nonlocal eval_seconds
        e0 = time.perf_counter()
        r = evaluate_problems(model, tok, probe)
        eval_seconds += time.perf_counter() - e0
        rec = {"step": step, "holdout_accuracy": r.accuracy, "holdout_step_validity": r.step_validity,
               "difficulty": PROBE_DIFFICULTY, "train_seconds": time.perf_counter() - t0 - eval_seconds}
        records.append(rec)
        return rec

    with progress(console) as bar:
        task_id = bar.add_task(f"teacher {cfg.preset} ({count_parameters(model) / 1e6:.2f}M)",
                                    total=cfg.train.steps, status="")

        def on_log(s: StepLog) -> None:
            records.append({"step": s.step, "loss": s.loss, "lr": s.lr, "tokens": s.tokens,
                            "tokens_per_s": s.tokens_per_s, "elapsed_s": s.elapsed_s})
            bar.update(task_id, completed=s.step,
                            status=f"loss {s.loss:.3f}  {s.tokens_per_s:,.0f} tok/s")

        def on_eval(step: int) -> dict[str, Any]:
            rec = probe_accuracy(step)
            bar.update(task_id, status=f"holdout {PROBE_DIFFICULTY}-op acc {rec['holdout_accuracy']:.1%}")
            return rec

        loop = LoopConfig.from_settings(cfg.train)
        model = train(model, batches(), causal_lm_loss_sum, loop, on_log=on_log, on_eval=on_eval)
        bar.update(task_id, completed=cfg.train.steps)
    final = probe_accuracy(cfg.train.steps)
    info = {
        "config": cfg.model_dump(), "preset": cfg.preset, "parameters": count_parameters(model),
        "train_seconds": final["train_seconds"], "probe_accuracy": final["holdout_accuracy"],
        "probe_difficulty": PROBE_DIFFICULTY, "torch_threads": torch.get_num_threads(),
    }
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
        (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    console.print(f"[green]teacher saved[/] {path}: {final['train_seconds']:.0f}s of training, "
                  f"holdout {PROBE_DIFFICULTY}-op accuracy {final['holdout_accuracy']:.1%}")
    return TeacherResult(path, False, info)


def model_path(ref: ModelRef, console: Console | None = None, *, train: bool = True) -> Path | None:
    """The folder a :class:`ModelRef` names: its ``path`` as given, or the built-in teacher's cached folder (``teach``,
    the default teacher when neither is set), trained first if it is not cached yet. With ``train=False`` an
    uncached built-in teacher gives ``None`` instead (for jobs that must not spend minutes training, e.g. serve).
    The one place a model reference is resolved."""
    if ref.path is not None:
        return Path(ref.path)
    cfg = ref.teach or TeacherConfig()
    if not train:
        path = teacher_dir(cfg)
        return path if (path / INFO_FILE).exists() else None
    return teach(cfg, console=console).path


def model_task(ref: ModelRef) -> ArithmeticTask:
    """The task a model reference was trained on: the built-in teacher's configured task (the default task for a
    ``path``), as a :class:`~distillarena.tasks.base.Task`."""
    return (ref.teach or TeacherConfig()).task.build()


def resolve_model(ref: ModelRef, console: Console | None = None) -> tuple[torch.nn.Module, Any, Path]:
    """Load the model and tokenizer a :class:`ModelRef` names (see :func:`model_path`)."""
    path = model_path(ref, console)
    return load_model(str(path)), load_tokenizer(str(path)), path


def export_teacher(result: TeacherResult, out: Path, *, overwrite: bool = False) -> Path:
    """Copy a cached teacher folder to ``out`` (a plain ``save_pretrained`` folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        from distillarena.core.errors import UserError

        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    with atomic_dir(out) as tmp:
        shutil.copytree(result.path, tmp, dirs_exist_ok=True)
    return out
