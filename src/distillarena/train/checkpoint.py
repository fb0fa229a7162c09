"""Checkpoints for exact resume, written so that a kill at any moment never leaves a corrupt latest one.

Layout: ``<root>/step-00000120/`` holds ``model.pt`` (the unwrapped model's state dict), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` (Python and torch RNG states of every process) and ``state.json`` (step, data
position, token count, anything the job adds), written last. Each folder is built under a temporary name beside
it and renamed into place in one step (:func:`distillarena.core.io.atomic_dir`), so a folder named ``step-*`` is
always complete; a kill during a save leaves only a hidden ``.step-*.tmp-*`` folder, removed at the next start.
Old checkpoints are pruned by renaming them out of the ``step-*`` namespace first, then deleting.

Test hook: ``DISTILLARENA_TEST_CRASH=checkpoint:N`` SIGKILLs the process half way through writing the checkpoint
of step ``N`` (after the model, before the optimizer); ``step:N`` right after optimizer step ``N``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")
CRASH_ENV = "DISTILLARENA_TEST_CRASH"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def maybe_crash(where: str, step: int) -> None:
    """Testing hook: SIGKILL this process at ``where:step`` if ``$DISTILLARENA_TEST_CRASH`` asks for it."""
    want = os.environ.get(CRASH_ENV)
    if want and want == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial(root: Path) -> None:
    """Delete what a killed save or prune left behind (hidden temporary folders)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".step-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, rng_states: list[dict[str, Any]], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically, then prune all but the ``keep`` newest (0 keeps all)."""
    root = Path(root)
    final = root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        torch.save(model_state, tmp / "model.pt")
        maybe_crash("checkpoint", step)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **state}, indent=2))
        _fsync_tree(tmp)
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            trash = old.with_name(f".trash-{old.name}")
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of one checkpoint folder; a damaged one is a UserError naming it."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT_VERSION}")
        return {
            "state": state,
            "model": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        }
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume "
                        "from the one before") from None
