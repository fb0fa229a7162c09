"""The server's YAML config and the per-key defense policy (pydantic; unknown keys are rejected).

Every field has a default that works on the built-in world: with no config at all, ``distillarena serve`` serves
the default teacher that ``distillarena teach`` trained and cached, undefended, on 127.0.0.1:8000, with the key
store and ledger in ``<cache>/serve/store.sqlite``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillarena.core.config import Strict, load_config
from distillarena.core.errors import UserError
from distillarena.defenses.spec import DEFENSES, DefenseKind, check_defense, defense_label
from distillarena.tasks.config import TaskConfig

GREEDY_BELOW = 1e-5  # a request temperature below this is greedy decoding (vLLM's threshold)
Freedom = Literal["open", "flatten", "fixed"]
# the parameters of a defense that only tempers and truncates the teacher's own distribution
_TEMPERING = frozenset({"temperature", "top_k", "top_p"})

# the kinds and defaults of the policy format before it took build_policy's names (keys stored then still load)
_LEGACY = {"top_k": ("truncation", "top_k", 5), "top_p": ("truncation", "top_p", 0.9),
           "temperature": ("temperature", "temperature", 2.0), "poe": ("poe", "gamma", 0.5),
           "antidistillation": ("antidistillation", "lam", 0.1)}


class PolicyConfig(Strict):
    """What one API key gets: a defense applied while sampling, and what is revealed about each token.

    ``defense`` and ``params`` are a defense kind and its parameters exactly as the game's ``DefenseConfig`` and
    ``distillarena.defenses.policy.build_policy`` name them (``none``, ``temperature``, ``truncation``, ``poe``,
    ``antidistillation``; ``temperature``, ``top_k``, ``top_p``, ``gamma``, ``lam``, ``method``, ``eps``,
    ``normalize``; and the output-level kinds, which rewrite each completion after sampling: ``answer_only``,
    ``truncate_reasoning``, ``summary``, ``paraphrase``, ``poison``, ``poison_scored``: a key with one reveals the
    rewritten text only); a parameter left out takes build_policy's default. The *policy's distribution* is what
    ``build_policy(defense, params).sample`` samples in process; a seeded request at temperature 1 with no top_p
    samples exactly that.

    What a request may change (:attr:`freedom`): an undefended key (``open``) takes any temperature (below
    :data:`GREEDY_BELOW`: greedy) and top_p. A defense that only tempers and truncates the teacher at a temperature
    of at least 1 (``flatten``) may be flattened further by the request's temperature (``softmax(log p / t)``,
    t >= 1), never sharpened (no t < 1, no greedy, no top_p). Any other defense (``fixed``: PoE, antidistillation,
    a temperature below 1) takes only temperature 1: flattening a distribution sharper than the teacher's could
    bring it back to the teacher. Revealed log-probs are always the policy's distribution's, whatever the request's
    sampling settings, with noise (keyed, fixed per context and token) and then rounding applied last.

    ``strength`` is shorthand for the kind's main parameter (``main`` in :mod:`distillarena.defenses.spec`):
    ``{defense: poe, strength: 0.4}`` is ``{defense: poe, params: {gamma: 0.4}}``. The policy is copied into the
    key's row when the key is created, so the same key always gets the same policy (changing the server's default
    later does not change existing keys).
    """

    defense: DefenseKind = "none"
    params: dict[str, float | int | str] = Field(default_factory=dict, description=(
        "the defense's parameters, as in a game config's defenses (distillarena.defenses.spec)"))
    logprobs: bool = Field(True, description="reveal log-probs at all (False: text only; asking for them is a 400)")
    max_top_logprobs: int = Field(5, ge=0, le=20, description="cap on top_logprobs / completions logprobs")
    decimals: int | None = Field(None, ge=0, le=10, description="round revealed log-probs to this many decimals")
    noise_std: float = Field(0.0, ge=0.0, description="Gaussian noise added to revealed log-probs (before rounding)")

    @model_validator(mode="before")
    @classmethod
    def _strength(cls, data):
        """``strength`` (and the earlier kinds ``top_k`` / ``top_p`` of stored keys) into ``params``."""
        if not isinstance(data, dict) or ("strength" not in data and data.get("defense") not in ("top_k", "top_p")):
            return data
        data = dict(data)
        strength = data.pop("strength", None)
        kind = data.get("defense", "none")
        if kind in ("top_k", "top_p") or (strength is None and kind in _LEGACY and "params" not in data):
            # a key stored by the earlier format: {defense, strength (None: that format's default)}
            kind, name, default = _LEGACY[kind]
            data["defense"] = kind
            if strength is None:
                strength = default
        elif strength is None:
            return data
        elif kind in DEFENSES and DEFENSES[kind].main is not None:
            name = DEFENSES[kind].main
        else:
            with_main = [k for k, spec in DEFENSES.items() if spec.main is not None]
            raise ValueError(f"strength is shorthand for the main parameter of {', '.join(with_main)}; "
                             f"give {kind!r} its params instead")
        params = dict(data.get("params") or {})
        if name in params:
            raise ValueError(f"give {name} once: as strength or in params")
        if isinstance(strength, float) and name == "top_k" and strength.is_integer():
            strength = int(strength)
        params[name] = strength
        data["params"] = params
        return data

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if not math.isfinite(self.noise_std):
            raise ValueError("noise_std must be finite")
        check_defense(self.defense, self.params)
        return self

    @property
    def needs_proxy(self) -> bool:
        return DEFENSES[self.defense].needs_proxy

    @property
    def rewrites_text(self) -> bool:
        """An output-level defense: the completion's text is rewritten after sampling, so no log-probs (of the
        teacher's, they would not be the revealed text's) and no streaming (tokens would be sent before the rewrite)."""
        return DEFENSES[self.defense].rewrites_text

    def label(self) -> str:
        """The ledger's and the game's label: ``none``, ``poe(gamma=0.5)``, ..."""
        return defense_label(self.defense, self.params)

    def canonical_params(self) -> dict:
        """The defense's parameters with build_policy's defaults filled in (numbers as floats)."""
        return DEFENSES[self.defense].params.model_validate(self.params).model_dump()

    @property
    def freedom(self) -> Freedom:
        """What a request may change of this policy's sampling distribution (see the class docstring)."""
        spec = DEFENSES[self.defense]
        # an output-level defense samples the teacher at its temperature / top-p alone; its rewrite comes after
        if not spec.rewrites_text and (spec.needs_proxy or not set(spec.parameter_names()) <= _TEMPERING):
            return "fixed"
        p = self.canonical_params()
        tau = float(p.get("temperature", 1.0))
        truncates = p.get("top_k") is not None or p.get("top_p") not in (None, 1.0)
        if tau == 1.0 and not truncates:
            return "open"
        return "flatten" if tau >= 1.0 else "fixed"

    def sampling_problem(self, temperature: float, top_p: float | None) -> tuple[str, str] | None:
        """``(param, message)`` if a request's sampling settings are not allowed with this policy, else None."""
        freedom = self.freedom
        if freedom == "open":
            return None
        what = f"This API key's policy ({self.label()}) fixes its sampling distribution"
        if top_p is not None and top_p < 1.0:
            return "top_p", (f"{what}: a request may not truncate it; top_p is {top_p:g}, only 1 is supported "
                             "with this key.")
        if freedom == "flatten" and temperature < 1.0:
            return "temperature", (f"{what}: a request may flatten it (temperature >= 1) but not sharpen it; "
                                   f"temperature {temperature:g} would sharpen it.")
        if freedom == "fixed" and temperature != 1.0:
            return "temperature", (f"{what}: temperature {temperature:g} is not supported, only 1 is with this "
                                   "key.")
        return None

    def noise_id(self) -> bytes:
        """What the reveal noise is keyed by, besides the server's secret: the defense (canonical parameters) and
        the noise level. Keys with the same policy see the same noise (several keys cannot average it away); a
        different defense or noise level gets independent noise (subtracting two keys' values cancels nothing)."""
        return json.dumps({"defense": self.defense, "params": self.canonical_params(), "noise_std": self.noise_std},
                          sort_keys=True).encode()


class BatchingConfig(Strict):
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows (prompts x n) sampled together at most")
    max_wait_ms: float = Field(50.0, ge=0.0, le=10_000, description=(
        "longest a request waits for others to join its batch; it waits only while the recent peak of requests in "
        "flight says more are coming (a lone client never waits)"))
    max_running: int = Field(8, ge=1, le=64, description=(
        "batches generating at once, a step of each in turn: a request that comes while others generate starts "
        "within about max_wait_ms instead of waiting for them to finish (1: one batch at a time)"))


class KeyDefaults(Strict):
    """Budgets and rate limit given to a new key when ``keys create`` has no flag for them (None: unlimited)."""

    max_requests: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0, description="the token budget")
    count_prompt_tokens: bool = Field(False, description="the token budget counts prompt tokens too (as providers "
                                      "bill); otherwise completion tokens (and prompt tokens a request scores)")
    rate_per_minute: float | None = Field(None, gt=0)
    burst: float | None = Field(None, ge=1, description="token-bucket size; None: one minute's worth")


class ServeConfig(Strict):
    """``distillarena serve``: a teacher behind an OpenAI-compatible API with keys, budgets and a ledger."""

    model: str | None = Field(None, description="save_pretrained folder or cached hub id; None: the default teacher")
    model_name: str | None = Field(None, description="the id clients pass as `model`; None: the folder's name")
    proxy: str | None = Field(None, description="proxy student for poe / antidistillation policies")
    proxy_gradient: str | None = Field(None, description="proxy gradient file for antidistillation policies")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the served model's task: what output-level "
                             "defenses (answer_only, summary, paraphrase, poison, ...) read as reasoning and answer")
    antidistillation_method: Literal["fd", "jvp"] = Field("fd", description=(
        "method of antidistillation keys whose params do not name one (build_policy's default is fd)"))
    store: str | None = Field(None, description="SQLite file of keys and ledger; None: <cache>/serve/store.sqlite")
    synchronous: Literal["normal", "full"] = Field(
        "normal", description="SQLite synchronous mode: normal survives a crash of the server, full a power loss")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_tokens_cap: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of /v1/completions when not given (OpenAI's); "
                                    "at most max_tokens_cap")
    max_n: int = Field(8, ge=1, le=128)
    max_prompts: int = Field(64, ge=1, description="prompts in one /v1/completions request at most (a game over "
                             "HTTP sends its batch_size, 64 by default, in one request)")
    default_policy: PolicyConfig = Field(default_factory=PolicyConfig)
    key_defaults: KeyDefaults = Field(default_factory=KeyDefaults)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    auth_failure_delay_ms: float = Field(250.0, ge=0, le=10_000, description=(
        "how long a refused key (401 / 403) waits before its answer: bounds how fast one connection can guess"))
    auth_kdf_share: float = Field(0.25, gt=0, le=1, description=(
        "share of one core that verifying secrets not yet proven in this process may use (scrypt); beyond it a "
        "request is answered 429 without verifying. A key proven once is checked in microseconds afterwards"))

    def store_path(self) -> Path:
        if self.store:
            return Path(self.store).expanduser()
        from distillarena.core.io import cache_dir

        return cache_dir() / "serve" / "store.sqlite"

    def model_path(self) -> str:
        if self.model:
            return self.model
        from distillarena.train.config import ModelRef
        from distillarena.train.teacher import model_path

        path = model_path(ModelRef(), train=False)
        if path is None:
            raise UserError("no model to serve: set `model:` in the serve config (or pass --model), "
                            "or run `distillarena teach` first to train the default teacher")
        return str(path)


def load_serve_config(path: str | Path | None) -> ServeConfig:
    return load_config(path, ServeConfig)


__all__ = ["GREEDY_BELOW", "BatchingConfig", "Freedom", "KeyDefaults", "PolicyConfig", "ServeConfig",
           "load_serve_config"]
