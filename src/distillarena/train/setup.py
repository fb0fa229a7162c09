"""Setting up a distillation run from its config: stages and the checks that need no model, then the teacher
(live model, top-k cache or text), the student, the data, and held-out evaluation. ``recipes.distill``
composes these; everything a user can get wrong is refused here before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json, cache_dir
from distillarena.core.progress import progress as progress_bar
from distillarena.models.fingerprint import model_fingerprint
from distillarena.models.presets import build_preset, load_model, load_tokenizer
from distillarena.models.tokenizer import task_tokenizer
from distillarena.objectives import available_objectives, cross_vocab_objectives, get_objective
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from distillarena.tasks.data import Example, arithmetic_examples, collate, encode_example, load_examples
from distillarena.teachers import (
    LocalTeacher,
    TextTeacher,
    TopKCache,
    check_tokenizers,
    context_length,
)
from distillarena.teachers.cross import CrossTokenizerTeacher, TokenizerPair
from distillarena.train.config import DistillConfig, StageConfig
from distillarena.train.distill import (
    Encoded,
    Stage,
    generator_for,
    heldout_divergences,
    heldout_nll,
    sample_completions,
)
from distillarena.train.student import add_lora, copy_with_layers_dropped, enable_gradient_checkpointing
from distillarena.train.teacher import model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            # the config's beta as set (stage, then top level); unset, the config's default 0.5 unless the objective
            # has its own default (aligned: 0, forward KL on its matched spans)
            own = spec.defaults["beta"]
            if sc.beta is not None:
                params["beta"] = sc.beta
            elif "beta" in cfg.model_fields_set or own is None:
                params["beta"] = cfg.beta
            else:
                params["beta"] = own
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
        spec = get_objective(st.objective)
        signals = spec.accepted_signals
        if cfg.cross_tokenizer is not None and kind != "text" and spec.uses_teacher and not spec.cross_vocab:
            raise UserError(f"{where} compares teacher and student token by token over one vocabulary, but "
                            "cross_tokenizer says their tokenizers differ: use one of "
                            f"{', '.join(cross_vocab_objectives())}, or sft on the teacher's text (seq_kd: true)")
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
            if cfg.teacher.api is not None:
                if st.seq_kd != cfg.seq_kd:
                    raise UserError(f"{where}: with an API teacher seq_kd is set once for the whole run (the "
                                    "teacher's answers are asked once, into its top-k cache)")
            elif st.seq_kd:
                raise UserError(f"{where}: with a top-k cache the data is the cache's own; build the cache with "
                                "seq_kd: true in the cache-teacher config, and train with seq_kd: false")
            if cfg.loss_temperature != 1.0:
                raise UserError("a loss temperature other than 1 needs the teacher's full distribution; a top-k "
                                "cache stores log-probs at temperature 1")


# --------------------------------------------------------------------------------------------------------------
# Teacher, student, data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Given:
    """Objects the Python API (``distillarena.distill``) hands over instead of the config's paths: models trained
    or read in memory (the config records their ``name_or_path``), and examples instead of ``data.source``."""

    student: torch.nn.Module | None = None
    student_tokenizer: Any = None
    teacher: torch.nn.Module | None = None
    teacher_tokenizer: Any = None
    train_examples: list[Example] | None = None
    eval_examples: list[Example] | None = None


@dataclass
class TeacherSetup:
    access: Any  # LocalTeacher | TopKCache | TextTeacher: what training reads
    model: LocalTeacher | None  # a live model, if any (seq_kd generation, held-out KL, layer copy)
    tokenizer: Any
    cache: TopKCache | None = None
    description: str = ""


def api_teacher_cache(cfg: DistillConfig, accelerator: Accelerator, console: Console,
                      out: Path | None = None, given: Given | None = None) -> Path:
    """The API teacher's top-k cache over the config's data (its own answers with ``seq_kd``): built once, asked
    only for what is not answered yet (``<cache>.responses.jsonl``), reused as is when complete."""
    from distillarena.teachers.api_client import Budget
    from distillarena.teachers.api_topk import TopKClient, build_api_topk_cache

    api = cfg.teacher.api
    assert api is not None
    tok = load_tokenizer(api.tokenizer or api.model)
    vocab = api.vocab_size or len(tok)
    data = build_data(cfg, tok, cfg.data.max_length or 1 << 30, given=given)
    pool = [(e.ids, e.labels) for e in data.train]
    weights = [e.weight for e in data.train]
    mode = "generate" if cfg.seq_kd else api.mode
    if out is None and api.cache:
        out = Path(api.cache).expanduser()
    if out is None:
        h = hashlib.sha256(json.dumps([api.base_url, api.model, api.top_logprobs, api.bits, mode, vocab,
                                       cfg.max_new_tokens, cfg.temperature, cfg.train.seed]).encode())
        for ids, labels in pool:
            h.update(json.dumps([ids, labels]).encode())
        out = cache_dir() / "api-teacher" / h.hexdigest()[:16]
    if (out / "manifest.json").is_file():
        return out
    key = None
    if api.key_env is not None:
        key = os.environ.get(api.key_env)
        if not key:
            raise UserError(f"teacher.api.key_env: the environment variable {api.key_env} holding the API key is "
                            "not set (set teacher.api.key_env: null for a server without keys)")
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (out / "manifest.json").is_file():
            client = TopKClient(base_url=api.base_url, api_key=key or "EMPTY", model=api.model,
                                top_logprobs=api.top_logprobs, mode=mode, tokenizer=tok,
                                max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.train.seed,
                                concurrency=api.concurrency, max_retries=api.max_retries, timeout=api.timeout)
            budget = (Budget(tokens=api.budget_tokens, requests=api.budget_requests)
                      if api.budget_tokens is not None or api.budget_requests is not None else None)
            with progress_bar(console) as progress:
                build_api_topk_cache(out, client, pool, weights=weights, vocab_size=vocab, bits=api.bits,
                                     teacher_id=f"api:{api.base_url}#{api.model}", budget=budget,
                                     meta={"data_config": cfg.data.model_dump(mode="json"), "seq_kd": cfg.seq_kd,
                                           "teacher": f"API {api.model} at {api.base_url}",
                                           "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                           "seed": cfg.train.seed},
                                     progress=progress)
    return out


def build_teacher(cfg: DistillConfig, accelerator: Accelerator, console: Console,
                  given: Given | None = None) -> TeacherSetup:
    src = cfg.teacher
    local = path = None
    if given is not None and given.teacher is not None:
        model = given.teacher.to(DTYPES[src.dtype])
        local = LocalTeacher(model, given.teacher_tokenizer, device=src.device or accelerator.device,
                             name=src.path or type(model).__name__)
        return TeacherSetup(local, local, local.tokenizer,
                            description=f"model object {src.path or type(model).__name__} ({src.dtype})")
    if src.api is not None:
        folder = api_teacher_cache(cfg, accelerator, console, given=given)
        cache = TopKCache(folder)
        what = "answers" if cfg.seq_kd else "scores of the data"
        return TeacherSetup(cache, None, cache.tokenizer, cache,
                            description=f"API teacher {src.api.model} ({what}, top-{cache.k}, cached in {folder})")
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


def build_student(cfg: DistillConfig, teacher: TeacherSetup, given: Given | None = None
                  ) -> tuple[torch.nn.Module, Any]:
    sc = cfg.student
    if given is not None and given.student is not None:
        model, tok = given.student, given.student_tokenizer or teacher.tokenizer
        if tok is None:
            raise UserError("the student model object needs its tokenizer (processing_class=...)")
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
    elif sc.init == "path":
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
    if teacher.tokenizer is not None and cfg.cross_tokenizer is None:
        check_tokenizers(tok, teacher.tokenizer, align_vocab=cfg.align_vocab)
        vs = model.get_output_embeddings().weight.shape[0]
        vt = teacher.model.vocab_size if teacher.model is not None else teacher.cache.vocab_size
        if vs != vt and not cfg.align_vocab:
            raise UserError(f"the student's output layer has {vs} rows and the teacher's {vt}: with the same "
                            "tokenizer this is a padded vocabulary; set align_vocab: true to use the shared rows")
    if sc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
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


def _encode_all(tok, exs: list[Example], max_length: int, what: str, teacher_tok=None) -> list[Encoded]:
    """Each example in the student's tokenization (and, with ``teacher_tok``, its twin in the teacher's)."""
    out = []
    for i, e in enumerate(exs):
        try:
            ids, labels = encode_example(tok, e, max_length=max_length)
            twin = encode_example(teacher_tok, e, max_length=max_length) if teacher_tok is not None else None
        except UserError as err:
            raise UserError(f"{what} example {i}: {err}") from None
        out.append(Encoded(ids, labels, float(e.weight), twin))
    return out


def build_data(cfg: DistillConfig, tok, max_length: int, data_cfg=None, teacher_tok=None,
               given: Given | None = None) -> DataSetup:
    """The training and held-out data in the student's tokenization; with ``teacher_tok`` (a teacher with another
    tokenizer) every example also carries its teacher twin. ``given`` examples replace ``data.source``."""
    d = data_cfg or cfg.data
    seed = cfg.train.seed
    problems = None
    if given is not None and given.train_examples is not None:
        exs = list(given.train_examples)
        if given.eval_examples is not None:
            held = list(given.eval_examples)[: cfg.eval.n_examples]
        else:
            n_held = min(cfg.eval.n_examples, len(exs) // 10)
            held, exs = (exs[len(exs) - n_held:], exs[:len(exs) - n_held]) if n_held else ([], exs)
        train_exs = exs[: d.train_size]
        desc = f"a dataset object: {len(train_exs)} training examples"
    elif d.source == "builtin":
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
    train_enc = _encode_all(tok, train_exs, max_length, "training", teacher_tok)
    held_enc = _encode_all(tok, held, max_length, "held-out", teacher_tok)
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
    if cfg.cross_tokenizer is not None:
        # no KL across two vocabularies: the student's NLL of the held-out text (the teacher's, when it has a model)
        for name, held in (("", data.heldout), *((f"{k}/", v) for k, v in data.probes.items())):
            if held:
                batches = [collate([(e.ids, e.labels) for e in held[i:i + batch_size]], pad)
                           for i in range(0, len(held), batch_size)]
                rec.update({f"{name}{k}": v for k, v in heldout_nll(student, batches).items()})
    elif teacher.model is not None and data.heldout:
        batches = [collate([(e.ids, e.labels) for e in data.heldout[i:i + batch_size]], pad)
                   for i in range(0, len(data.heldout), batch_size)]
        rec.update(heldout_divergences(student, teacher.model, batches))
    for name, probe in (data.probes if teacher.model is not None and cfg.cross_tokenizer is None else {}).items():
        batches = [collate([(e.ids, e.labels) for e in probe[i:i + batch_size]], pad)
                   for i in range(0, len(probe), batch_size)]
        rec.update({f"{name}/{k}": v for k, v in heldout_divergences(student, teacher.model, batches).items()})
    if data.problems:
        was = student.training
        ev = evaluate_problems(student, tok, data.problems, max_new_tokens=cfg.eval.max_new_tokens)
        student.train(was)
        rec.update(accuracy=ev.accuracy, step_validity=ev.step_validity,
                   **{f"accuracy_{k}op": v["accuracy"] for k, v in ev.by_difficulty.items()},
                   correct=ev.outcomes)  # per held-out problem: paired comparisons between runs
        rec.update(_choice_entropies(student, teacher, tok, data.problems[:CHOICE_PROBES]))
    return rec


CHOICE_PROBES = 64  # held-out problems whose first-step entropy is tracked over training


def _choice_entropies(student: torch.nn.Module, teacher: TeacherSetup, tok, problems: list) -> dict[str, float]:
    """Mean next-token entropy where the first step is chosen (problems with several valid solutions), for the
    student and the live teacher: where mode collapse shows first."""
    from distillarena.evaluate.task_eval import per_position_entropy

    out: dict[str, float] = {}
    models = {"choice_entropy": (student, tok)}
    if teacher.model is not None:  # the teacher reads its own tokenization (another one with cross_tokenizer)
        models["teacher_choice_entropy"] = (teacher.model.model, teacher.model.tokenizer)
    for key, (model, model_tok) in models.items():
        was = model.training
        with torch.no_grad():
            first = per_position_entropy(model, model_tok, problems).get("first_multi") or []
        model.train(was)
        if first:
            out[key] = sum(first) / len(first)
    return out


def _student_twin(pair: TokenizerPair, e: Encoded) -> Encoded:
    """An example known in the teacher's tokenization (a cache's, a teacher generation) in the student's, with the
    teacher's as its twin."""
    plen = e.prompt_len
    p_ids = pair.prompt_to_student(e.ids[:plen])
    c_ids = pair.to_student(e.ids[plen:])
    return Encoded(p_ids + c_ids, [-100] * len(p_ids) + c_ids, e.weight, (e.ids, e.labels))


def _teacher_text(pair: TokenizerPair, teacher: LocalTeacher, pool: list[Encoded], cfg: DistillConfig,
                  accelerator: Accelerator, console: Console) -> tuple[list[Encoded], dict[str, Any]]:
    """``pool`` (student examples with teacher twins) with the teacher's own completions of their prompts (generated
    once and cached, as for seq_kd), in both tokenizations."""
    assert all(e.teacher is not None for e in pool)
    twins, info = seq_kd_pool(teacher, [Encoded(*e.teacher, e.weight) for e in pool], cfg, accelerator, console)
    out = []
    for e, t in zip(pool, twins, strict=True):
        c_ids = pair.to_student(t.ids[t.prompt_len:])
        p_ids = e.ids[:e.prompt_len]
        out.append(Encoded(p_ids + c_ids, [-100] * len(p_ids) + c_ids, e.weight, (t.ids, t.labels)))
    return out, info


def training_data(cfg: DistillConfig, teacher: TeacherSetup, student: torch.nn.Module, tok, stages: list[Stage],
                  accelerator: Accelerator, console: Console, given: Given | None = None
                  ) -> tuple[DataSetup, dict[str, list], dict | None]:
    """The run's data and its pools (``data``, and ``seq_kd``: the teacher's generations, cached): a top-k cache
    brings its own examples (and the data config it was built over). With ``cross_tokenizer`` every example also
    carries its twin in the teacher's tokenization, and the held-out text is the teacher's own (when it has a
    model)."""
    data_cfg = None
    if teacher.cache is not None:
        meta = teacher.cache.manifest.get("meta", {})
        if "data" in cfg.model_fields_set and meta.get("data_config") not in (None, cfg.data.model_dump(mode="json")):
            raise UserError(f"top-k cache {cfg.teacher.cache} was built over other data than this config's "
                            "`data` section; leave `data` out (the cache's data is used) or rebuild the cache")
        if meta.get("data_config") is not None:
            from distillarena.train.config import DataConfig

            data_cfg = DataConfig.model_validate(meta["data_config"])
    cross = cfg.cross_tokenizer is not None and teacher.tokenizer is not None
    pair = TokenizerPair.of(tok, teacher.tokenizer) if cross else None
    teacher_tok = teacher.tokenizer if cross else None
    max_len = max_length_of(cfg, student, teacher.model.model if teacher.model else None)
    if teacher.cache is not None:
        train_pool = [Encoded(ids, labels, w) for (ids, labels), w in
                      zip(teacher.cache.examples, teacher.cache.weights, strict=True)]
        if pair is not None:
            train_pool = [_student_twin(pair, e) for e in train_pool]
        too_long = max((len(e.ids) for e in train_pool), default=0)
        if too_long > max_len:
            raise UserError(f"the cache holds a sequence of {too_long} tokens, longer than the student's context "
                            f"of {max_len}")
        data = build_data(cfg, tok, max_len, data_cfg, teacher_tok, given=given)
        data.train = train_pool
        data.description = f"the top-k cache's {len(train_pool)} examples"
    else:
        data = build_data(cfg, tok, max_len, teacher_tok=teacher_tok, given=given)
    check_generation_fits(data, stages, cfg.max_new_tokens)
    pools = {"data": data.train}
    seq_kd_info = None
    if any(st.seq_kd for st in stages):
        if teacher.model is None:
            raise UserError("seq_kd needs a teacher model to generate completions")
        if pair is not None:
            pools["seq_kd"], seq_kd_info = _teacher_text(pair, teacher.model, data.train, cfg, accelerator, console)
        else:
            pools["seq_kd"], seq_kd_info = seq_kd_pool(teacher.model, data.train, cfg, accelerator, console)
    if pair is not None and teacher.model is not None and data.heldout:
        data.heldout, _ = _teacher_text(pair, teacher.model, data.heldout, cfg, accelerator, console)
    return data, pools, seq_kd_info


def teacher_access(cfg: DistillConfig, teacher: TeacherSetup, tok) -> Any:
    """What the loss reads: the teacher's access, lined up with the student's tokenization if it has another."""
    if cfg.cross_tokenizer is None or teacher.tokenizer is None or teacher.access.kind == "text":
        return teacher.access
    return CrossTokenizerTeacher(teacher.access, tok, teacher.tokenizer, pairing=cfg.cross_tokenizer.pairing)
