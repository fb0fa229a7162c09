"""Config plumbing shared by every layer: the strict pydantic base and YAML loading with errors that name the
field and the file."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from distillarena.core.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)



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

