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

import hashlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from distillarena.core.config import dump_config
from distillarena.core.errors import UserError
from distillarena.core.io import JsonlWriter, atomic_dir, atomic_write_json, atomic_write_text, cache_dir
from distillarena.core.progress import progress as progress_bar
from distillarena.models.fingerprint import model_fingerprint
from distillarena.models.presets import build_preset, count_parameters, load_model, load_tokenizer
from distillarena.models.tokenizer import task_tokenizer
from distillarena.objectives import available_objectives, get_objective
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from distillarena.tasks.data import Example, arithmetic_examples, collate, encode_example, load_examples
from distillarena.teachers import (
    LocalTeacher,
    TextTeacher,
    TopKCache,
    build_topk_cache,
    check_tokenizers,
    context_length,
)
from distillarena.train.checkpoint import latest_checkpoint
from distillarena.train.config import DistillConfig, StageConfig
from distillarena.train.distill import (
    DistillLoss,
    DistillStream,
    Encoded,
    OnPolicy,
    Stage,
    generator_for,
    heldout_divergences,
    sample_completions,
)
from distillarena.train.loop import LoopConfig, StepLog, train
from distillarena.train.student import add_lora, copy_with_layers_dropped, plain_model
from distillarena.train.teacher import model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillResult:
    out: Path
    summary: dict[str, Any]

    @property
    def student_path(self) -> Path:
        return self.out / "student"


# --------------------------------------------------------------------------------------------------------------
# Config resolution and checks that need no model
# --------------------------------------------------------------------------------------------------------------


def resolve_stages(cfg: DistillConfig) -> list[Stage]:
    """The schedule: one stage per ``stages`` entry (or one for the whole run), unset fields inherited."""
    specs = cfg.stages or [StageConfig(steps=cfg.train.steps)]
    known = available_objectives()
    stages, first = [], 1
    for i, sc in enumerate(specs):
        where = f"stages[{i}]" if cfg.stages else "objective"
        name = sc.objective or cfg.objective
        if name not in known:
            raise UserError(f"{where}: unknown objective {name!r}; available: {', '.join(known)}")
        params = dict(cfg.objective_params if sc.objective_params is None else sc.objective_params)
        spec = get_objective(name)
        if "beta" in spec.defaults and "beta" not in params:
            params["beta"] = sc.beta if sc.beta is not None else cfg.beta
        try:
            spec.resolve_params(params)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        lmbda = sc.lmbda if sc.lmbda is not None else cfg.lmbda
        seq_kd = sc.seq_kd if sc.seq_kd is not None else cfg.seq_kd
        stages.append(Stage(first, first + sc.steps - 1, name, params, lmbda, seq_kd))
        first += sc.steps
    return stages


def _objectives_taking(kind: str) -> list[str]:
    """Registered objectives that learn from a teacher signal of ``kind``."""
    return [n for n in available_objectives()
            if kind in get_objective(n).accepted_signals and get_objective(n).uses_teacher]


def check_regimes(cfg: DistillConfig, stages: list[Stage]) -> None:
    """Refuse a regime or objective that the teacher's access cannot feed, before any model is loaded."""
    kind = cfg.teacher.kind
    for i, st in enumerate(stages):
        where = f"stage {i + 1} ({st.objective})" if len(stages) > 1 else f"objective {st.objective!r}"
        signals = get_objective(st.objective).accepted_signals
        if kind == "text":
            if "none" not in signals:
                raise UserError(f"{where} needs the teacher's log-probs ({', '.join(sorted(signals))}), but the "
                                "teacher is text-only (teacher.text: true): use objective 'sft' (sequence KD on "
                                "the teacher's text, optionally weighted per example), or give a teacher model")
            if st.lmbda > 0:
                raise UserError(f"{where}: on-policy batches (lmbda > 0) need a teacher that scores the student's "
                                "samples; a text-only teacher cannot")
            if st.seq_kd:
                raise UserError(f"{where}: seq_kd needs a teacher model to generate; with a text-only teacher "
                                "the data's completions already are the teacher's text (set seq_kd: false)")
        if kind == "topk":
            if "topk" not in signals:
                raise UserError(f"{where} cannot learn from a top-k cache (it accepts: "
                                f"{', '.join(sorted(signals - {'none'}))}): use a teacher model, or one of "
                                f"{', '.join(_objectives_taking('topk'))}")
            if st.lmbda > 0:
                raise UserError(f"{where}: on-policy batches (lmbda > 0) need a live teacher to score the "
                                "student's samples; a top-k cache only covers its own dataset")
            if st.seq_kd:
                raise UserError(f"{where}: with a top-k cache the data is the cache's own; build the cache with "
                                "seq_kd: true in the cache-teacher config, and train with seq_kd: false")
            if cfg.loss_temperature != 1.0:
                raise UserError("a loss temperature other than 1 needs the teacher's full distribution; a top-k "
                                "cache stores log-probs at temperature 1")


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
# Teacher, student, data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TeacherSetup:
    access: Any  # LocalTeacher | TopKCache | TextTeacher: what training reads
    model: LocalTeacher | None  # a live model, if any (seq_kd generation, held-out KL, layer copy)
    tokenizer: Any
    cache: TopKCache | None = None
    description: str = ""


def build_teacher(cfg: DistillConfig, accelerator: Accelerator, console: Console) -> TeacherSetup:
    src = cfg.teacher
    local = path = None
    ref = src.model_ref()
    if ref is not None:
        with accelerator.main_process_first():
            path = str(model_path(ref, console if accelerator.is_main_process else Console(quiet=True)))
    if path is not None:
        model = load_model(path, dtype=DTYPES[src.dtype])
        tok = load_tokenizer(path)
        local = LocalTeacher(model, tok, device=src.device or accelerator.device, name=path)
    cache = None
    if src.cache:
        cache = TopKCache(src.cache)
        if local is not None and model_fingerprint(local.model) != cache.teacher_id:
            raise UserError(f"top-k cache {src.cache} was built for another teacher (or another dtype) than "
                            f"{path}: rebuild it with `distillarena cache-teacher`, or name the right teacher")
        if local is not None:
            check_tokenizers(local.tokenizer, cache.tokenizer, what="top-k cache")
    if src.kind == "text":
        return TeacherSetup(TextTeacher(), None, None, description="text only")
    if cache is not None:
        return TeacherSetup(cache, local, cache.tokenizer, cache,
                            description=f"top-k cache {src.cache} (k={cache.k})")
    assert local is not None
    return TeacherSetup(local, local, local.tokenizer, description=f"model {path} ({src.dtype})")


def build_student(cfg: DistillConfig, teacher: TeacherSetup) -> tuple[torch.nn.Module, Any]:
    sc = cfg.student
    if sc.init == "path":
        model, tok = load_model(sc.path), load_tokenizer(sc.path)
    elif sc.init == "from_teacher":
        if teacher.model is None:
            raise UserError("student.from_teacher copies the teacher's layers: it needs a teacher model "
                            "(teacher.teach or teacher.path)")
        model = copy_with_layers_dropped(teacher.model.model, sc.from_teacher.keep_every)
        tok = teacher.tokenizer
    else:
        tok = (load_tokenizer(sc.tokenizer) if sc.tokenizer else teacher.tokenizer if teacher.tokenizer is not None
               else task_tokenizer())
        model = build_preset(sc.preset, tok, seed=sc.seed)
    model = model.to(torch.float32)
    if teacher.tokenizer is not None:
        check_tokenizers(tok, teacher.tokenizer, align_vocab=cfg.align_vocab)
        vs = model.get_output_embeddings().weight.shape[0]
        vt = teacher.model.vocab_size if teacher.model is not None else teacher.cache.vocab_size
        if vs != vt and not cfg.align_vocab:
            raise UserError(f"the student's output layer has {vs} rows and the teacher's {vt}: with the same "
                            "tokenizer this is a padded vocabulary; set align_vocab: true to use the shared rows")
    if sc.lora is not None:
        model = add_lora(model, sc.lora.r, sc.lora.alpha, sc.lora.dropout, sc.lora.target_modules)
    return model, tok


def task_config(cfg: DistillConfig) -> ArithmeticConfig:
    return cfg.data.task.arithmetic()


@dataclass
class DataSetup:
    train: list[Encoded]
    heldout: list[Encoded]
    problems: list | None  # built-in held-out problems for accuracy
    max_length: int
    description: str
    probes: dict[str, list[Encoded]] = field(default_factory=dict)  # more held-out sets (data.probes), by name


def max_length_of(cfg: DistillConfig, *models: torch.nn.Module | None) -> int:
    limits = [cfg.data.max_length] + [context_length(m) for m in models if m is not None]
    limits = [x for x in limits if x]
    return min(limits) if limits else 1 << 30


def _encode_all(tok, exs: list[Example], max_length: int, what: str) -> list[Encoded]:
    out = []
    for i, e in enumerate(exs):
        try:
            ids, labels = encode_example(tok, e, max_length=max_length)
        except UserError as err:
            raise UserError(f"{what} example {i}: {err}") from None
        out.append(Encoded(ids, labels, float(e.weight)))
    return out


def build_data(cfg: DistillConfig, tok, max_length: int, data_cfg=None) -> DataSetup:
    d = data_cfg or cfg.data
    seed = cfg.train.seed
    problems = None
    if d.source == "builtin":
        acfg = d.task.arithmetic()
        train_exs = arithmetic_examples("train", d.train_size, d.task.n_ops, seed=seed, config=acfg)
        held = (arithmetic_examples("holdout", cfg.eval.n_examples, cfg.eval.difficulties, seed=seed, config=acfg)
                if cfg.eval.n_examples else [])
        if cfg.eval.n_problems:
            problems = ArithmeticTask(acfg).problems("holdout", cfg.eval.n_problems, cfg.eval.difficulties,
                                                     seed=seed + 1)
        desc = f"built-in arithmetic, {d.train_size} training problems ({d.task.n_ops} operations)"
    else:
        if Path(d.source).is_file() and Path(d.source).stat().st_size == 0:
            raise UserError(f"dataset {d.source!r} is empty")
        exs = load_examples(d.source)
        if d.eval_source:
            held = load_examples(d.eval_source, limit=cfg.eval.n_examples) if cfg.eval.n_examples else []
        else:
            n_held = min(cfg.eval.n_examples, len(exs) // 10)
            held, exs = (exs[len(exs) - n_held:], exs[:len(exs) - n_held]) if n_held else ([], exs)
        train_exs = exs[: d.train_size]
        desc = f"{d.source}: {len(train_exs)} training examples"
    if not train_exs:
        raise UserError("the training dataset is empty")
    train_enc = _encode_all(tok, train_exs, max_length, "training")
    held_enc = _encode_all(tok, held, max_length, "held-out")
    if not any(lab != -100 for e in train_enc for lab in e.labels[1:]):
        raise UserError("the training dataset has no completion tokens to learn from")
    probes = {name: _encode_all(tok, load_examples(src, limit=cfg.eval.n_examples), max_length, f"probe {name!r}")
              for name, src in d.probes.items()} if cfg.eval.n_examples else {}
    return DataSetup(train_enc, held_enc, problems, max_length, desc, probes)


def check_generation_fits(data: DataSetup, stages: list[Stage], max_new_tokens: int) -> None:
    if not any(st.lmbda > 0 or st.seq_kd for st in stages):
        return
    longest = max(e.prompt_len for e in data.train)
    if longest + max_new_tokens > data.max_length:
        raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the models' "
                        f"context of {data.max_length} tokens; lower max_new_tokens or shorten the prompts")


def seq_kd_pool(teacher: LocalTeacher, pool: list[Encoded], cfg: DistillConfig, accelerator: Accelerator,
                console: Console, batch_size: int = 64) -> tuple[list[Encoded], dict[str, Any]]:
    """The training pool with the teacher's own completions, generated once and cached on disk (reused by every
    run with the same teacher, prompts, sampling temperature, max_new_tokens and seed)."""
    h = hashlib.sha256()
    h.update(model_fingerprint(teacher.model).encode())
    for e in pool:
        h.update(json.dumps(e.ids[:e.prompt_len]).encode())
    h.update(f"{cfg.max_new_tokens}:{cfg.temperature}:{cfg.train.seed}".encode())
    key = h.hexdigest()[:16]
    folder = cache_dir() / "seq_kd" / key
    info: dict[str, Any] = {"path": str(folder), "reused": True}
    with accelerator.main_process_first():
        if not (folder / "completions.json").is_file():
            info["reused"] = False
            if accelerator.is_main_process:
                tok = teacher.tokenizer
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                t0 = time.perf_counter()
                comps: list[list[int]] = []
                with console.status(f"seq_kd: the teacher generates {len(pool)} completions (once, cached)"):
                    for b0 in range(0, len(pool), batch_size):
                        part = pool[b0:b0 + batch_size]
                        gen = generator_for(teacher.device, cfg.train.seed, "seq_kd", b0)
                        comps += sample_completions(teacher.model, [e.ids[:e.prompt_len] for e in part],
                                                    max_new_tokens=cfg.max_new_tokens,
                                                    temperature=cfg.temperature, generator=gen, pad_id=pad,
                                                    eos_id=tok.eos_token_id)
                with atomic_dir(folder) as tmp:
                    (tmp / "completions.json").write_text(json.dumps(comps))
                    atomic_write_json(tmp / "info.json", {"n": len(comps), "seconds": time.perf_counter() - t0,
                                                          "max_new_tokens": cfg.max_new_tokens,
                                                          "temperature": cfg.temperature})
    comps = json.loads((folder / "completions.json").read_text())
    out = [Encoded(e.ids[:e.prompt_len] + c, [-100] * e.prompt_len + c, e.weight)
           for e, c in zip(pool, comps, strict=True)]
    return out, info


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def evaluate_student(student: torch.nn.Module, tok, teacher: TeacherSetup, data: DataSetup, cfg: DistillConfig,
                     batch_size: int = 32) -> dict[str, Any]:
    from distillarena.evaluate.task_eval import evaluate_problems

    rec: dict[str, Any] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if teacher.model is not None and data.heldout:
        batches = [collate([(e.ids, e.labels) for e in data.heldout[i:i + batch_size]], pad)
                   for i in range(0, len(data.heldout), batch_size)]
        rec.update(heldout_divergences(student, teacher.model, batches))
    for name, probe in (data.probes if teacher.model is not None else {}).items():
        batches = [collate([(e.ids, e.labels) for e in probe[i:i + batch_size]], pad)
                   for i in range(0, len(probe), batch_size)]
        rec.update({f"{name}/{k}": v for k, v in heldout_divergences(student, teacher.model, batches).items()})
    if data.problems:
        was = student.training
        ev = evaluate_problems(student, tok, data.problems, max_new_tokens=cfg.eval.max_new_tokens)
        student.train(was)
        rec.update(accuracy=ev.accuracy, step_validity=ev.step_validity,
                   **{f"accuracy_{k}op": v["accuracy"] for k, v in ev.by_difficulty.items()})
    return rec


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


def run_distill(cfg: DistillConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
                console: Console | None = None) -> DistillResult:
    """Distill per ``cfg`` into the run folder ``out`` (see the module docstring)."""
    t_start = time.perf_counter()
    out = Path(out)
    stages = resolve_stages(cfg)
    check_regimes(cfg, stages)
    check_run_dir(out, resume=resume, overwrite=overwrite)
    trackers = _trackers(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=str(out))
    main = accelerator.is_main_process
    console = console or Console()
    if not main:
        console = Console(quiet=True)
    world = accelerator.num_processes
    if cfg.train.grad_accum % world:
        raise UserError(f"train.grad_accum ({cfg.train.grad_accum}) must be a multiple of the number of processes "
                        f"({world}): the global batch is batch_size x grad_accum micro-batches, shared out among "
                        "the processes")

    teacher = build_teacher(cfg, accelerator, console)
    student, tok = build_student(cfg, teacher)
    data_cfg = None
    if teacher.cache is not None:
        meta = teacher.cache.manifest.get("meta", {})
        if "data" in cfg.model_fields_set and meta.get("data_config") not in (None, cfg.data.model_dump(mode="json")):
            raise UserError(f"top-k cache {cfg.teacher.cache} was built over other data than this config's "
                            "`data` section; leave `data` out (the cache's data is used) or rebuild the cache")
        if meta.get("data_config") is not None:
            from distillarena.train.config import DataConfig

            data_cfg = DataConfig.model_validate(meta["data_config"])
    max_len = max_length_of(cfg, student, teacher.model.model if teacher.model else None)
    if teacher.cache is not None:
        train_pool = [Encoded(ids, labels, w) for (ids, labels), w in
                      zip(teacher.cache.examples, teacher.cache.weights, strict=True)]
        too_long = max((len(e.ids) for e in train_pool), default=0)
        if too_long > max_len:
            raise UserError(f"the cache holds a sequence of {too_long} tokens, longer than the student's context "
                            f"of {max_len}")
        data = build_data(cfg, tok, max_len, data_cfg)
        data.train = train_pool
        data.description = f"the top-k cache's {len(train_pool)} examples"
    else:
        data = build_data(cfg, tok, max_len)
    check_generation_fits(data, stages, cfg.max_new_tokens)
    pools = {"data": data.train}
    seq_kd_info = None
    if any(st.seq_kd for st in stages):
        if teacher.model is None:
            raise UserError("seq_kd needs a teacher model to generate completions")
        pools["seq_kd"], seq_kd_info = seq_kd_pool(teacher.model, data.train, cfg, accelerator, console)

    # --- the run folder: only now is anything written into it
    resolved = dump_config(cfg)
    if main:
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
    loss_fn = DistillLoss(teacher.access, stages, unwrap=unwrap, seed=cfg.train.seed,
                          loss_temperature=cfg.loss_temperature, align_vocab=cfg.align_vocab)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    on_policy = None
    if any(st.lmbda > 0 for st in stages):
        on_policy = OnPolicy(unwrap, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.train.seed, pad_id=pad, eos_id=tok.eos_token_id)
    stream = DistillStream(pools, stages, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                           world=world, rank=accelerator.process_index, seed=cfg.train.seed, pad_id=pad)
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
        trained = train(student, stream, loss_fn, loop, accelerator=accelerator, on_log=on_log,
                        on_eval=lambda step: evaluate(step, student), prepare=on_policy,
                        checkpoint_dir=out / "checkpoints", resume=resume)
        progress.update(task, completed=loop.steps)
    final = evaluate(loop.steps, trained)
    summary: dict[str, Any] = {}
    if main:
        with atomic_dir(out / "student") as tmp:
            plain_model(trained).save_pretrained(tmp)
            tok.save_pretrained(tmp)
        if cfg.student.lora is not None:
            with atomic_dir(out / "student-adapter") as tmp:
                trained.save_pretrained(tmp)
        summary = {
            "student": str(out / "student"), "teacher": teacher.description, "data": data.description,
            "stages": [{"first": s.first, "last": s.last, "objective": s.objective, "params": s.params,
                        "regime": s.regime} for s in stages],
            "steps": loop.steps, "processes": world, "eval_initial": initial, "eval_final": final,
            "seq_kd_cache": seq_kd_info, "resumed_from": str(resuming_from) if resuming_from else None,
            "student_parameters": count_parameters(trained), "wall_seconds": time.perf_counter() - t_start,
        }
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
    return DistillResult(out, summary)


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
    if cfg.teacher.kind != "model":
        raise UserError("cache-teacher needs a teacher model (teacher.teach or teacher.path), not a cache or text")
    if cfg.lmbda > 0 or any((s.lmbda or 0) > 0 for s in cfg.stages):
        raise UserError("cache-teacher caches off-policy data; set lmbda: 0 (on-policy batches need a live teacher)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or another --out")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
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
