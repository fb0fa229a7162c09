"""Shared helpers of the distillation tests (no tests here): tiny configs, weights, the CLI in a subprocess.
(The tiny teacher folder is a fixture in conftest.py.)"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


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
