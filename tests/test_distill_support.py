"""Shared helpers of the distillation tests (no tests here): a tiny teacher folder and tiny configs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (this machine's cores are shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, task_tok) -> Path:
    """A random ``tiny`` preset with a sharpened output (final norm x4), saved as a plain model folder: a teacher
    with low, context-dependent entropy, built in a blink (no training)."""
    from distillarena.models.presets import build_preset

    model = build_preset("tiny", task_tok, seed=123)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    model.save_pretrained(path)
    task_tok.save_pretrained(path)
    return path


def tiny_config(teacher_path: Path | None, **over) -> dict:
    cfg = {
        "teacher": {"path": str(teacher_path)} if teacher_path is not None else {},
        "student": {"preset": "tiny"},
        "data": {"train_size": 32},
        "objective": "fkl",
        "max_new_tokens": 16,
        "train": {"steps": 3, "batch_size": 4, "grad_accum": 1, "log_every": 1, "eval_every": 0,
                  "warmup_steps": 1},
        "eval": {"n_examples": 8, "n_problems": 4, "max_new_tokens": 16},
        "checkpoint": {"every": 0},
    }
    for k, v in over.items():
        if k in ("train", "eval", "data") and isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return copy.deepcopy(cfg)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.pop("DISTILLARENA_TEST_CRASH", None)
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distillarena.cli", *args], cwd=ROOT, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)
