"""The Python API, exported lazily at the package root (``from distillarena import distill``).

* :func:`distill`: one distillation run with model and dataset objects or paths, in the words of TRL's trainers
  (``model=``, ``teacher_model=``, ``train_dataset=``, ``processing_class=``); everything else is a
  :class:`~distillarena.train.config.DistillConfig` field, given as a keyword (``objective="hpd"``,
  ``train={"steps": 50}``) or as ``config=`` (a config object, a dict or a YAML path).
* :func:`trl_loss`: any registered objective with the signature of TRL's ``GKDTrainer.generalized_jsd_loss``, to
  drop into a TRL trainer; :data:`hpd_loss` is ``trl_loss("hpd")``.

This module sits beside ``cli`` at the top of the layers: it composes ``recipes.distill`` like the command line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distillarena.core.config import format_validation_error
from distillarena.core.errors import UserError
from distillarena.recipes.distill import DistillResult, new_run_dir, run_distill
from distillarena.train.config import DistillConfig
from distillarena.train.setup import Given


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _config_dict(config: DistillConfig | Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, DistillConfig):
        return config.model_dump(mode="json", exclude_unset=True)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))
    p = Path(config)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a mapping of fields")
    return data


def _name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or f"<{type(model).__name__} object>")


def _examples(dataset: Any, what: str):
    """Examples from a ``datasets.Dataset`` or any iterable of rows (prompt/completion or chat ``messages``,
    optional ``weight``), read exactly as a data file would be."""
    from distillarena.tasks.data import load_examples

    if not isinstance(dataset, Iterable) or isinstance(dataset, str | bytes | Mapping):
        raise UserError(f"{what}: expected a path, a datasets.Dataset or a list of rows, got {type(dataset).__name__}")
    with tempfile.TemporaryDirectory(prefix="distillarena-data-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            n = 0
            for row in dataset:
                if not isinstance(row, Mapping):
                    raise UserError(f"{what} row {n}: expected a mapping of columns, got {type(row).__name__}")
                f.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
                n += 1
        if n == 0:
            raise UserError(f"{what} is empty")
        try:
            return load_examples(str(path))
        except UserError as e:
            raise UserError(f"{what}: {str(e).replace(repr(str(path)), 'the dataset')}") from None


def distill(model: Any = None, teacher_model: Any = None, train_dataset: Any = None, *,
            eval_dataset: Any = None, processing_class: Any = None, teacher_processing_class: Any = None,
            config: DistillConfig | Mapping[str, Any] | str | Path | None = None, output_dir: str | Path | None = None,
            resume: bool = False, overwrite: bool = False, quiet: bool = False, **fields: Any) -> DistillResult:
    """Distill ``teacher_model`` into ``model`` on ``train_dataset``; returns the run (``.model``: the trained
    student, ``.student_path``: its ``save_pretrained`` folder, ``.summary``: the held-out metrics).

    model: the student, a model object (trained in place) or a folder / hub id; None: the config's student.
    teacher_model: a model object, a folder / hub id, or a teacher section (``{"api": {...}}``); None: the
    config's teacher. train_dataset / eval_dataset: a ``datasets.Dataset``, a list of rows, or a data path.
    processing_class: the student's tokenizer (also the teacher's unless ``teacher_processing_class``); needed
    with model objects whose ``name_or_path`` is not a folder. ``fields``: DistillConfig fields, merged over
    ``config``. output_dir: the run folder (default ``runs/distill-<time>``).
    """
    data = _deep_merge(_config_dict(config), fields)
    given = Given()
    if model is not None:
        student = {k: v for k, v in (data.get("student") or {}).items() if k not in ("preset", "from_teacher", "path")}
        if isinstance(model, str | Path):
            student["path"] = str(model)
        else:
            student["path"] = _name(model)
            given.student = model
        data["student"] = student
    if teacher_model is not None:
        teacher = {k: v for k, v in (data.get("teacher") or {}).items() if k in ("dtype", "device", "cache")}
        if isinstance(teacher_model, Mapping):
            teacher = _deep_merge(teacher, teacher_model)
        elif isinstance(teacher_model, str | Path):
            teacher["path"] = str(teacher_model)
        else:
            teacher["path"] = _name(teacher_model)
            given.teacher = teacher_model
        data["teacher"] = teacher
    for what, ds, attr in (("train_dataset", train_dataset, "train_examples"),
                           ("eval_dataset", eval_dataset, "eval_examples")):
        if ds is None:
            continue
        section = dict(data.get("data") or {})
        key = "source" if attr == "train_examples" else "eval_source"
        if isinstance(ds, str | Path):
            section[key] = str(ds)
        else:
            section[key] = f"<{what}>"
            setattr(given, attr, _examples(ds, what))
        data["data"] = section
    if given.eval_examples is not None and given.train_examples is None:
        raise UserError("eval_dataset as an object needs train_dataset as an object too")
    try:
        cfg = DistillConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"distill(): the config is invalid:\n{format_validation_error(e)}") from None
    from distillarena.models.presets import load_tokenizer

    def tokenizer_of(obj: Any, explicit: Any) -> Any:
        if explicit is not None:
            return explicit
        name = getattr(obj, "name_or_path", "")
        if not name:
            raise UserError("a model object without name_or_path needs processing_class= (its tokenizer)")
        return load_tokenizer(name)

    if given.student is not None:
        given.student_tokenizer = tokenizer_of(given.student, processing_class)
    if given.teacher is not None:
        given.teacher_tokenizer = tokenizer_of(given.teacher, teacher_processing_class or processing_class)
    if given.student is not None or given.teacher is not None:
        given.student_tokenizer = given.student_tokenizer or given.teacher_tokenizer
    out = Path(output_dir) if output_dir is not None else new_run_dir(
        Path(os.environ.get("DISTILLARENA_RUNS", "runs")), None)
    from rich.console import Console

    return run_distill(cfg, out, resume=resume, overwrite=overwrite, console=Console(quiet=quiet), given=given)


def trl_loss(objective: str = "hpd", **params: Any) -> Callable[..., Any]:
    """``objective`` with the signature and reductions of TRL's ``GKDTrainer.generalized_jsd_loss``
    (``student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
    num_items_in_batch=None``), computed chunk by chunk in float32 (``compute_objective``).
    ``beta`` is passed on to objectives that take one; ``params`` fix the objective's own (``trl_loss("hpd",
    reinforce=False)``). Reductions: ``batchmean`` (per valid token), ``sum``, or ``num_items_in_batch`` (the
    sum over it). Use it as ``class MyTrainer(GKDTrainer): generalized_jsd_loss = staticmethod(hpd_loss)``."""
    from distillarena.objectives import TeacherSignal, compute_objective, get_objective

    spec = get_objective(objective)
    spec.resolve_params(dict(params))  # unknown parameters fail now, not at the first step

    def loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean",
             num_items_in_batch=None):
        p = dict(params)
        if "beta" in spec.defaults and "beta" not in p:
            p["beta"] = beta
        out = compute_objective(objective, student_logits, TeacherSignal.dense(teacher_logits), labels,
                                temperature=temperature, **p)
        if num_items_in_batch is not None:
            return out.loss_sum / num_items_in_batch
        if reduction == "sum":
            return out.loss_sum
        if reduction != "batchmean":
            raise UserError(f"trl_loss({objective!r}): reduction {reduction!r} is not supported (batchmean, sum)")
        return out.mean()

    loss.__name__ = loss.__qualname__ = f"{objective}_loss"
    loss.__doc__ = f"distillarena's {objective!r} objective with TRL's generalized_jsd_loss signature."
    return loss


hpd_loss = trl_loss("hpd")

__all__ = ["DistillConfig", "DistillResult", "distill", "hpd_loss", "trl_loss"]
