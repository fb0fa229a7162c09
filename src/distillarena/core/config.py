"""Config plumbing shared by every layer: the strict pydantic base and YAML loading with errors that name the
field and the file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from distillarena.core.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)



C = TypeVar("C", bound=BaseModel)


# --- overrides (``--set key.path=value`` on the command line) -----------------------------------------------

Override = tuple[tuple[str, ...], Any, str]  # (path, value, the text as given)


def parse_override(text: str) -> Override:
    """``"train.steps=50"`` -> ``(("train", "steps"), 50, text)``; the value is read as YAML (``true``, ``1e-3``,
    ``[1, 2]``, ``null``; anything else is a string)."""
    key, sep, raw = text.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise UserError(f"--set {text!r}: expected KEY.PATH=VALUE (e.g. --set train.steps=50)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value, text


def apply_overrides(data: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """``data`` (a config as loaded from YAML, not yet validated) with each override set at its path; missing
    sections are created, a list element is addressed by its index (``stages.0.steps``)."""
    for path, value, text in overrides:
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            where = ".".join(path[:i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {text}: {'.'.join(path[:i]) or 'the config'} is a list of {len(node)}; "
                                    f"{part!r} is not an index of it")
                part_key: Any = int(part)
            elif isinstance(node, dict):
                part_key = part
            else:
                raise UserError(f"--set {text}: {'.'.join(path[:i])} is a {type(node).__name__}, not a section")
            if last:
                node[part_key] = value
            else:
                if isinstance(node, dict) and node.get(part_key) is None:
                    node[part_key] = {}
                node = node[part_key]
                if not isinstance(node, dict | list):
                    raise UserError(f"--set {text}: {where} is a {type(node).__name__}, not a section")
    return data


_PENDING: ContextVar[list[Override] | None] = ContextVar("config_overrides", default=None)
_USED: ContextVar[list[bool] | None] = ContextVar("config_overrides_used", default=None)


@contextlib.contextmanager
def config_overrides(overrides: list[Override]) -> Iterator[list[bool]]:
    """The first :func:`load_config` inside (the command's own config, whatever the command) applies
    ``overrides`` (the CLI's ``--set``); configs loaded after it (a game's config read by ``explain``) do not. The
    yielded list holds ``True`` once they have been applied."""
    used: list[bool] = []
    t1, t2 = _PENDING.set(list(overrides)), _USED.set(used)
    try:
        yield used
    finally:
        _PENDING.reset(t1)
        _USED.reset(t2)


def load_config(path: str | Path | None, cls: type[C], overrides: list[Override] | None = None) -> C:
    """Read and validate a YAML config; ``None`` gives the defaults. ``overrides`` (or those of an enclosing
    :func:`config_overrides`) are set into it first, and validated with it."""
    if overrides is None:
        overrides = _PENDING.get() or []
        if overrides:
            _PENDING.set(None)  # consumed by the command's own config
            if (used := _USED.get()) is not None:
                used.append(True)
    if path is None:
        data: Any = {}
        what = "the default config"
    else:
        p = Path(path)
        what = f"config file {p}"
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must be a mapping of fields, not {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        what += " with " + " ".join(f"--set {t}" for _, _, t in overrides)
    if path is None and not overrides:
        return cls()
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{what} is invalid:\n{format_validation_error(e)}") from None


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

