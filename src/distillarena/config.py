"""YAML configs validated by pydantic. Every field has a default that works on the built-in world;
an unknown or ill-typed field is an error that names the field and the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Strict):
    """The built-in arithmetic task."""

    n_ops: list[int] = Field(default_factory=lambda: [1, 2, 3], description="difficulties trained on")
    add_max: int = Field(50, ge=1, le=999)
    mul_max: int = Field(9, ge=2, le=99)
    max_value: int = Field(999, ge=10)
    word_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("n_ops")
    @classmethod
    def _ops_in_range(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= k <= 4 for k in v):
            raise ValueError("each number of operations must be between 1 and 4, and the list non-empty")
        return v


class TrainConfig(Strict):
    steps: int = Field(900, ge=1)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 0
    log_every: int = Field(25, ge=1)
    eval_every: int = Field(100, ge=0, description="held-out accuracy every N steps (0: only at the end)")


class TeacherConfig(Strict):
    """``distillarena teach``: a preset trained by plain supervised learning on the built-in task."""

    preset: str = "base"
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def cache_key(self, tokenizer_id: str) -> str:
        blob = json.dumps({"teacher": self.model_dump(), "tokenizer": tokenizer_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvalConfig(Strict):
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    n_per_difficulty: int = Field(200, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0


class DemoConfig(Strict):
    """``distillarena demo``: the whole story on the built-in world."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


C = TypeVar("C", bound=BaseModel)


def load_config(path: str | Path | None, cls: type[C]) -> C:
    """Read and validate a YAML config; ``None`` gives the defaults."""
    if path is None:
        return cls()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a mapping of fields, not {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(f"config file {p} is invalid:\n{format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown field")
        else:
            lines.append(f"  - {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
