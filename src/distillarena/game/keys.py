"""Cache keys of the game's run folder: traces, the base student and each cell are stored under the digest of
everything that determines them, so a rerun reuses exactly what it may."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from distillarena.defenses.spec import DEFENSES
from distillarena.game.config import AttackerConfig, DefenseConfig, GameConfig
from distillarena.train.config import TeacherConfig

UNDEFENDED = DefenseConfig(kind="none", params={})


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def world_of(cfg: GameConfig) -> dict[str, Any]:
    """The task and teacher: every cell of a run folder must share them."""
    task = (cfg.teacher.teach or TeacherConfig()).task.model_dump(mode="json")
    return {"task": task, "teacher": cfg.teacher.model_dump(mode="json")}


def traces_key(cfg: GameConfig, d: DefenseConfig, seed: int, samples_per_prompt: int = 1) -> str:
    proxy = d.proxy.model_dump(mode="json") if DEFENSES[d.kind].needs_proxy else None
    what = {"world": world_of(cfg), "defense": d.kind, "params": d.params, "proxy": proxy,
            "holdout_traces": d.holdout_traces if DEFENSES[d.kind].needs_gradient else None, "seed": seed,
            "budget": cfg.budget, "prompts": cfg.prompts.model_dump(mode="json"),
            "reveal": cfg.reveal.model_dump(mode="json"), "answer_forcing": cfg.answer_forcing,
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    if DEFENSES[d.kind].needs_gradient and d.holdout != "reference":
        what["holdout"] = d.holdout  # (the reference holdout keeps the key it had before the choice existed)
    if cfg.decoding.params():  # (left out at the plain temperature 1, so earlier run folders keep their keys)
        what["decoding"] = cfg.decoding.params()
    if samples_per_prompt > 1:  # k samples of each of budget // k prompts (self-consistency)
        what["samples_per_prompt"] = samples_per_prompt
    if cfg.api is not None:  # traces collected over HTTP are cached apart from those sampled in process
        what["api"] = {"base_url": cfg.api.base_url, "model": cfg.api.model, "token_ids": cfg.api.token_ids}
        if not cfg.api.key_for(d.kind, cfg.decoding.under(d.params)).reveals_logprobs:
            what["api"]["reveals_logprobs"] = False
    return digest(what)


def base_key(cfg: GameConfig) -> str:
    return digest({"world": world_of(cfg), "student": cfg.student.model_dump(mode="json"),
                   "eval": cfg.eval.model_dump(mode="json")})


def cell_key(cfg: GameConfig, d: DefenseConfig, a: AttackerConfig, seed: int) -> str:
    return digest({"traces": traces_key(cfg, d, seed, a.samples_per_prompt), "base": base_key(cfg),
                   "attacker": a.key_fields(), "train": cfg.train.model_dump(mode="json"), "holdout": cfg.holdout,
                   "oracle": cfg.oracle.model_dump(mode="json") if a.spec.uses_oracle else None})
