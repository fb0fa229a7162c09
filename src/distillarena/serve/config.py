"""The server's YAML config and the per-key defense policy (pydantic; unknown keys are rejected).

Every field has a default that works on the built-in world: with no config at all, ``distillarena serve`` serves
the default teacher that ``distillarena teach`` trained and cached, undefended, on 127.0.0.1:8000, with the key
store and ledger in ``<cache>/serve/store.sqlite``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillarena.config import Strict, load_config
from distillarena.errors import UserError

DEFENSES = ("none", "poe", "antidistillation", "temperature", "top_k", "top_p")
# what ``strength`` means for each defense, and its default
STRENGTH = {
    "none": ("unused", None),
    "poe": ("gamma in [0, 1]: (1 - gamma) z_teacher + gamma z_proxy", 0.5),
    "antidistillation": ("lambda (finite): z / tau + lambda * b", 0.1),
    "temperature": ("tau > 0: the teacher's logits divided by tau before the client's own temperature", 2.0),
    "top_k": ("k >= 1: only the k most likely tokens can be sampled", 5.0),
    "top_p": ("p in (0, 1]: nucleus truncation before the client's own top_p", 0.9),
}


class PolicyConfig(Strict):
    """What one API key gets: a defense applied while sampling, and what is revealed about each token.

    The policy is copied into the key's row when the key is created, so the same key always gets the same policy
    (changing the server's default later does not change existing keys).
    """

    defense: Literal["none", "poe", "antidistillation", "temperature", "top_k", "top_p"] = "none"
    strength: float | None = Field(None, description="the defense's parameter (see STRENGTH); None: its default")
    logprobs: bool = Field(True, description="reveal log-probs at all (False: text only; asking for them is a 400)")
    max_top_logprobs: int = Field(5, ge=0, le=20, description="cap on top_logprobs / completions logprobs")
    decimals: int | None = Field(None, ge=0, le=10, description="round revealed log-probs to this many decimals")
    noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise added to revealed log-probs (before rounding)")

    @model_validator(mode="after")
    def _check_strength(self) -> PolicyConfig:
        s = self.resolved_strength
        d = self.defense
        if not math.isfinite(self.noise_std):
            raise ValueError("noise_std must be finite")
        if d == "none":
            return self
        if s is None or not math.isfinite(s):
            raise ValueError(f"{d} needs a finite strength")
        if d == "poe" and not 0.0 <= s <= 1.0:
            raise ValueError(f"poe strength (gamma) must be in [0, 1], got {s}")
        if d == "temperature" and not s > 0:
            raise ValueError(f"temperature strength (tau) must be > 0, got {s}")
        if d == "top_k" and (s < 1 or int(s) != s):
            raise ValueError(f"top_k strength (k) must be an integer >= 1, got {s}")
        if d == "top_p" and not 0.0 < s <= 1.0:
            raise ValueError(f"top_p strength (p) must be in (0, 1], got {s}")
        return self

    @property
    def resolved_strength(self) -> float | None:
        return STRENGTH[self.defense][1] if self.strength is None else float(self.strength)

    @property
    def needs_proxy(self) -> bool:
        return self.defense in ("poe", "antidistillation")

    def label(self) -> str:
        """Short text for the ledger: ``none``, ``poe:0.5``, ..."""
        if self.defense == "none":
            return "none"
        s = self.resolved_strength
        return f"{self.defense}:{int(s) if self.defense == 'top_k' else s:g}"


class BatchingConfig(Strict):
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows (prompts x n) sampled together at most")
    max_wait_ms: float = Field(50.0, ge=0.0, le=10_000, description=(
        "longest a request waits for others to join its batch; it waits only while the recent peak of requests in "
        "flight says more are coming (a lone client never waits)"))


class KeyDefaults(Strict):
    """Budgets and rate limit given to a new key when ``keys create`` has no flag for them (None: unlimited)."""

    max_requests: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    rate_per_minute: float | None = Field(None, gt=0)
    burst: float | None = Field(None, ge=1, description="token-bucket size; None: one minute's worth")


class ServeConfig(Strict):
    """``distillarena serve``: a teacher behind an OpenAI-compatible API with keys, budgets and a ledger."""

    model: str | None = Field(None, description="save_pretrained folder or cached hub id; None: the default teacher")
    model_name: str | None = Field(None, description="the id clients pass as `model`; None: the folder's name")
    proxy: str | None = Field(None, description="proxy student for poe / antidistillation policies")
    proxy_gradient: str | None = Field(None, description="proxy gradient file for antidistillation policies")
    antidistillation_method: Literal["fd", "jvp"] = "fd"
    store: str | None = Field(None, description="SQLite file of keys and ledger; None: <cache>/serve/store.sqlite")
    synchronous: Literal["normal", "full"] = Field(
        "normal", description="SQLite synchronous mode: normal survives a crash of the server, full a power loss")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_tokens_cap: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of /v1/completions when not given (OpenAI's); "
                                    "at most max_tokens_cap")
    max_n: int = Field(8, ge=1, le=128)
    max_prompts: int = Field(16, ge=1, description="prompts in one /v1/completions request at most")
    default_policy: PolicyConfig = Field(default_factory=PolicyConfig)
    key_defaults: KeyDefaults = Field(default_factory=KeyDefaults)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    def store_path(self) -> Path:
        if self.store:
            return Path(self.store).expanduser()
        from distillarena.paths import cache_dir

        return cache_dir() / "serve" / "store.sqlite"

    def model_path(self) -> str:
        if self.model:
            return self.model
        from distillarena.config import TeacherConfig
        from distillarena.recipes.teach import INFO_FILE, teacher_dir

        path = teacher_dir(TeacherConfig())
        if not (path / INFO_FILE).exists():
            raise UserError("no model to serve: set `model:` in the serve config (or pass --model), "
                            "or run `distillarena teach` first to train the default teacher")
        return str(path)


def load_serve_config(path: str | Path | None) -> ServeConfig:
    return load_config(path, ServeConfig)


__all__ = ["DEFENSES", "STRENGTH", "BatchingConfig", "KeyDefaults", "PolicyConfig", "ServeConfig",
           "load_serve_config"]
