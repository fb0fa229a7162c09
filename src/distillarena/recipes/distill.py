"""``distillarena distill`` and ``distillarena cache-teacher``: distill a teacher into a student, in one run folder.

The recipe resolves the config (stages, regimes, teacher access), checks everything a user can get wrong *before*
writing anything (unknown objective, an objective the teacher's signal cannot feed, mismatched tokenizers, an
empty dataset, sequences longer than the models' context, a cache built for another teacher or tokenizer), then
runs the one training loop with the distillation loss, evaluates on held-out data, and saves the student.

Run folder: ``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, ``student/``
(``save_pretrained`` + tokenizer; LoRA adapters merged, the adapter itself in ``student-adapter/``), and
``tensorboard/`` when TensorBoard is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distillarena.core.config import dump_config
from distillarena.core.errors import UserError
from distillarena.core.io import JsonlWriter, atomic_dir, atomic_write_json, atomic_write_text
from distillarena.core.progress import progress as progress_bar
from distillarena.models.fingerprint import model_fingerprint
from distillarena.models.presets import count_parameters
from distillarena.teachers import (
    build_topk_cache,
)
from distillarena.teachers.cross import CrossTokenizerTeacher
from distillarena.train.checkpoint import latest_checkpoint
from distillarena.train.config import DistillConfig, PushToHubConfig
from distillarena.train.distill import (
    DistillLoss,
    DistillStream,
    OnPolicy,
    Stage,
)
from distillarena.train.loop import LoopConfig, StepLog, full_precision_accelerator, train
from distillarena.train.setup import (
    Given,
    api_teacher_cache,
    build_data,
    build_student,
    build_teacher,
    check_generation_fits,
    check_regimes,
    evaluate_student,
    max_length_of,
    resolve_stages,
    seq_kd_pool,
    teacher_access,
    training_data,
)
from distillarena.train.student import UnderPrecision, plain_model


@dataclass
class DistillResult:
    out: Path
    summary: dict[str, Any]
    model: torch.nn.Module | None = None  # the trained student, in memory (LoRA adapters not merged)

    @property
    def student_path(self) -> Path:
        return self.out / "student"


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if not out.exists() or not any(out.iterdir()):
        return
    if resume:
        if not (out / "config.yaml").is_file():
            raise UserError(f"{out} is not a distill run folder (no config.yaml): nothing to resume")
        return
    if not overwrite:
        raise UserError(f"run folder {out} already exists and is not empty; pass --resume to continue it, "
                        "--overwrite to start it again, or another --out")


def new_run_dir(root: Path, out: Path | None) -> Path:
    if out is not None:
        return Path(out)
    from datetime import datetime

    return Path(root) / f"distill-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------


def _trackers(cfg: DistillConfig) -> list[str]:
    out = []
    tb = cfg.logging.tensorboard
    have_tb = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    if tb and not have_tb:
        raise UserError("logging.tensorboard: true needs the tensorboard package (pip install tensorboard)")
    if tb or (tb is None and have_tb):
        out.append("tensorboard")
    if cfg.logging.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.wandb: true needs the wandb package (pip install wandb)")
        out.append("wandb")
    return out


def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, float | int | str | bool]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float | str | bool):
            out[f"{prefix}{k}"] = v
        elif v is not None:
            out[f"{prefix}{k}"] = str(v)
    return out


def write_run_folder(out: Path, cfg: DistillConfig, *, resume: bool, overwrite: bool) -> None:
    """The run folder's ``config.yaml`` (a resumed run must have the same), after clearing the outputs of an
    overwritten run: the first thing written, once every check has passed."""
    resolved = dump_config(cfg)
    if resume and (out / "config.yaml").is_file():
        if (out / "config.yaml").read_text() != resolved:
            raise UserError(f"{out}/config.yaml differs from this config: resume with the run's own config "
                            f"({out}/config.yaml), or start a new run")
    if overwrite and out.exists():
        for name in ("checkpoints", "student", "student-adapter", "metrics.jsonl", "summary.json",
                     "tensorboard"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", resolved)


def save_student(trained: torch.nn.Module, tok, out: Path, *, lora: bool) -> None:
    """``student/`` (a plain ``save_pretrained`` folder, adapters merged) and, with LoRA, ``student-adapter/``."""
    with atomic_dir(out / "student") as tmp:
        plain_model(trained).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if lora:
        with atomic_dir(out / "student-adapter") as tmp:
            trained.save_pretrained(tmp)


def check_can_push(push: PushToHubConfig) -> None:
    from distillarena.models.hub import hub_offline

    if importlib.util.find_spec("huggingface_hub") is None:  # pragma: no cover - a transformers dependency
        raise UserError("push_to_hub needs the huggingface_hub package")
    if hub_offline():
        raise UserError(f"push_to_hub ({push.repo_id}) needs the network, but HF_HUB_OFFLINE is set (the "
                        "distillarena command sets it unless the environment does): run with HF_HUB_OFFLINE=0")


def push_student(folder: Path, push: PushToHubConfig) -> dict[str, Any]:
    """Upload the ``student/`` folder to the model repository ``push.repo_id`` (created if missing)."""
    from huggingface_hub import HfApi

    token = os.environ.get(push.token_env) if push.token_env else None
    api = HfApi(token=token or None)
    try:
        api.create_repo(push.repo_id, private=push.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=push.repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=push.commit_message)
    except Exception as e:  # network, auth, a name taken: the student stays saved locally either way
        raise UserError(f"push_to_hub: uploading {folder} to {push.repo_id} failed ({type(e).__name__}: {e}); "
                        "the student is saved locally") from None
    return {"repo_id": push.repo_id, "url": str(getattr(info, "commit_url", "") or ""),
            "commit": getattr(info, "oid", None)}


def run_distill(cfg: DistillConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
                console: Console | None = None, given: Given | None = None) -> DistillResult:
    """Distill per ``cfg`` into the run folder ``out`` (see the module docstring). ``given``: model and dataset
    objects of the Python API, used instead of the config's paths."""
    t_start = time.perf_counter()
    out = Path(out)
    stages = resolve_stages(cfg)
    check_regimes(cfg, stages)
    if cfg.teacher.api is not None:  # the API teacher's answers (seq_kd) are its cache's data, read off-policy
        stages = [dataclasses.replace(st, seq_kd=False) for st in stages]
    check_run_dir(out, resume=resume, overwrite=overwrite)
    trackers = _trackers(cfg)
    accelerator = full_precision_accelerator(log_with=trackers or None, project_dir=str(out))
    main = accelerator.is_main_process
    console = console or Console()
    if not main:
        console = Console(quiet=True)
    world = accelerator.num_processes
    if cfg.train.grad_accum % world:
        raise UserError(f"train.grad_accum ({cfg.train.grad_accum}) must be a multiple of the number of processes "
                        f"({world}): the global batch is batch_size x grad_accum micro-batches, shared out among "
                        "the processes")

    if cfg.push_to_hub is not None:
        check_can_push(cfg.push_to_hub)  # before any training: a push that cannot happen is refused now
    teacher = build_teacher(cfg, accelerator, console, given)
    student, tok = build_student(cfg, teacher, given)
    data, pools, seq_kd_info = training_data(cfg, teacher, student, tok, stages, accelerator, console, given)

    # the run folder: only now is anything written into it
    if main:
        write_run_folder(out, cfg, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    resuming_from = latest_checkpoint(out / "checkpoints") if resume else None
    if main and resume:
        _cut_torn_line(out / "metrics.jsonl")  # a kill may have torn the last record
    metrics = JsonlWriter(out / "metrics.jsonl") if main else None
    if trackers:
        accelerator.init_trackers("tensorboard" if "tensorboard" in trackers else "distill",
                                  config=_scalars(json.loads(json.dumps(cfg.model_dump(mode="json")))))

    def record(rec: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(rec)
        if trackers:
            step = rec.get("step", 0)
            accelerator.log({f"{rec['phase']}/{k}": v for k, v in rec.items()
                             if isinstance(v, int | float) and k != "step"}, step=step)

    if main:
        console.print(f"[bold]distill[/] teacher: {teacher.description}; student: {cfg.student.init} "
                      f"({count_parameters(student) / 1e6:.2f}M parameters); data: {data.description}")
        for i, st in enumerate(stages):
            console.print(f"  stage {i + 1}: steps {st.first}-{st.last}, objective {st.objective} "
                          f"{st.params or ''}, {st.regime}")
        if resuming_from is not None:
            console.print(f"[yellow]resuming[/] from {resuming_from}")
            record({"phase": "resume", "from": str(resuming_from), "step": int(resuming_from.name.split("-")[1])})

    unwrap = accelerator.unwrap_model
    access = teacher_access(cfg, teacher, tok)
    loss_fn = DistillLoss(access, stages, unwrap=unwrap, seed=cfg.train.seed,
                          loss_temperature=cfg.loss_temperature, align_vocab=cfg.align_vocab)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ttok = teacher.tokenizer
    tpad = ttok.pad_token_id if ttok is not None and ttok.pad_token_id is not None else 0
    to_teacher = access.pair.to_teacher if isinstance(access, CrossTokenizerTeacher) else None
    on_policy = None
    if any(st.lmbda > 0 for st in stages):
        on_policy = OnPolicy(unwrap, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.train.seed, pad_id=pad, eos_id=tok.eos_token_id, to_teacher=to_teacher,
                             teacher_pad_id=tpad)
    stream = DistillStream(pools, stages, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                           world=world, rank=accelerator.process_index, seed=cfg.train.seed, pad_id=pad,
                           teacher_pad_id=tpad)
    loop = LoopConfig.from_settings(cfg.train, steps=cfg.total_steps, grad_accum=cfg.train.grad_accum // world,
                                    checkpoint_every=cfg.checkpoint.every, keep_checkpoints=cfg.checkpoint.keep)
    last_eval: dict[str, Any] = {}

    def evaluate(step: int, model: torch.nn.Module) -> dict[str, Any]:
        if not main:
            return {}
        e0 = time.perf_counter()
        rec = evaluate_student(unwrap(model), tok, teacher, data, cfg)
        rec = {"phase": "eval", "step": step, **rec, "eval_seconds": time.perf_counter() - e0}
        record(rec)
        last_eval.clear()
        last_eval.update(rec)
        return rec

    initial = evaluate(0, student) if resuming_from is None else {}
    start = int(resuming_from.name.split("-")[1]) if resuming_from else 0
    with (progress_bar(console) if main else _NullProgress()) as progress:
        task = progress.add_task("distill", total=loop.steps, status="", completed=start)

        def on_log(s: StepLog) -> None:
            si = stream.stage_index(s.step)
            rec = {"phase": "train", "step": s.step, "stage": si + 1, "objective": stages[si].objective,
                   "loss": s.loss, "lr": s.lr, "tokens": s.tokens, "tokens_per_s": s.tokens_per_s,
                   "elapsed_s": s.elapsed_s, **loss_fn.pop_metrics()}
            if on_policy is not None:
                rec["on_policy_fraction"] = on_policy.pop_fraction()
            record(rec)
            status = f"loss {s.loss:.4f}  {s.tokens_per_s:,.0f} tok/s"
            if "heldout_fkl" in last_eval:
                status += f"  held-out KL {last_eval['heldout_fkl']:.4f} (step {last_eval['step']})"
            progress.update(task, completed=s.step, status=status)

        # ``student`` is the module being trained (the loop wraps it, the parameters are the same)
        # student.dtype bfloat16: the loss (forward included) and on-policy sampling under autocast
        dtype = cfg.student.dtype
        trained = train(student, stream, UnderPrecision(loss_fn, dtype, accelerator.device), loop,
                        accelerator=accelerator, on_log=on_log, on_eval=lambda step: evaluate(step, student),
                        prepare=UnderPrecision(on_policy, dtype, accelerator.device) if on_policy is not None else None,
                        checkpoint_dir=out / "checkpoints", resume=resume)
        progress.update(task, completed=loop.steps)
    final = evaluate(loop.steps, trained)
    summary: dict[str, Any] = {}
    if main:
        save_student(trained, tok, out, lora=cfg.student.lora is not None)
        summary = {
            "student": str(out / "student"), "teacher": teacher.description, "data": data.description,
            "stages": [{"first": s.first, "last": s.last, "objective": s.objective, "params": s.params,
                        "regime": s.regime} for s in stages],
            "steps": loop.steps, "processes": world, "eval_initial": initial, "eval_final": final,
            "seq_kd_cache": seq_kd_info, "resumed_from": str(resuming_from) if resuming_from else None,
            "student_parameters": count_parameters(trained), "wall_seconds": time.perf_counter() - t_start,
        }
        if cfg.push_to_hub is not None:
            summary["hub"] = push_student(out / "student", cfg.push_to_hub)
            console.print(f"[bold green]student pushed[/] to {cfg.push_to_hub.repo_id}")
        atomic_write_json(out / "summary.json", summary)
        msg = f"[bold green]student saved[/] {out / 'student'}"
        if "heldout_fkl" in final:
            before = initial.get("heldout_fkl")
            msg += f"; held-out forward KL {final['heldout_fkl']:.4f}"
            msg += f" (from {before:.4f})" if before is not None else ""
        if "accuracy" in final:
            msg += f"; accuracy {final['accuracy']:.1%}"
        console.print(msg)
    if metrics is not None:
        metrics.close()
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return DistillResult(out, summary, trained)


def _cut_torn_line(path: Path) -> None:
    if path.is_file():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)


class _NullProgress:
    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None

    def advance(self, *a: Any, **k: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------------------------
# cache-teacher
# --------------------------------------------------------------------------------------------------------------


def run_cache_teacher(cfg: DistillConfig, out: Path, *, k: int = 128, bits: int = 8, overwrite: bool = False,
                      console: Console | None = None) -> dict[str, Any]:
    """Run the config's teacher once over its training data and write a top-k cache folder ``out``."""
    console = console or Console()
    out = Path(out)
    if cfg.teacher.api is not None:  # the served teacher's top-k (its k is teacher.api.top_logprobs)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"{out} already exists and is not empty; pass --overwrite or another --out")
        if out.exists() and overwrite:
            shutil.rmtree(out)
        t0 = time.perf_counter()
        folder = api_teacher_cache(cfg, full_precision_accelerator(), console, out=out)
        stats = dict(json.loads((folder / "manifest.json").read_text())["stats"])
        stats["seconds"] = time.perf_counter() - t0
        console.print(f"[bold green]top-k cache[/] {out}: k={cfg.teacher.api.top_logprobs} from the API teacher, "
                      f"{stats['positions']:,} target positions")
        return stats
    if cfg.teacher.kind != "model":
        raise UserError("cache-teacher needs a teacher model (teacher.teach or teacher.path) or an API teacher "
                        "(teacher.api), not a cache or text")
    if cfg.lmbda > 0 or any((s.lmbda or 0) > 0 for s in cfg.stages):
        raise UserError("cache-teacher caches off-policy data; set lmbda: 0 (on-policy batches need a live teacher)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or another --out")
    accelerator = full_precision_accelerator()
    teacher = build_teacher(cfg, accelerator, console)
    local = teacher.model
    assert local is not None
    data = build_data(cfg, local.tokenizer, max_length_of(cfg, local.model))
    pool = data.train
    if cfg.seq_kd:
        check_generation_fits(data, [Stage(1, 1, "sft", seq_kd=True)], cfg.max_new_tokens)
        pool, _ = seq_kd_pool(local, pool, cfg, accelerator, console)
    t0 = time.perf_counter()
    with progress_bar(console) as progress:
        stats = build_topk_cache(
            out, local, [(e.ids, e.labels) for e in pool], weights=[e.weight for e in pool], k=k, bits=bits,
            teacher_id=model_fingerprint(local.model),
            meta={"data_config": cfg.data.model_dump(mode="json"), "seq_kd": cfg.seq_kd,
                  "teacher": teacher.description, "max_new_tokens": cfg.max_new_tokens,
                  "temperature": cfg.temperature, "seed": cfg.train.seed},
            progress=progress)
    d = stats.as_dict()
    d["seconds"] = time.perf_counter() - t0
    console.print(f"[bold green]top-k cache[/] {out}: k={min(k, local.vocab_size)}, {bits}-bit log-probs, "
                  f"{stats.positions:,} target positions, {stats.signal_bytes_per_token:.0f} bytes/token "
                  f"({stats.file_bytes_per_token:.0f} with the token ids and offsets), "
                  f"mean KL(teacher || cached) {stats.kl_mean:.2e} (max {stats.kl_max:.2e})")
    return d
