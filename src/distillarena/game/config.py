"""Configs of defended decoding (``distillarena traces``) and of the distillation game (``distillarena game``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from distillarena.attacks.spec import ATTACKERS, AttackerKind, AttackerSpec, PaperParams
from distillarena.core.config import Strict
from distillarena.core.errors import UserError
from distillarena.defenses.spec import DefenseKind, check_defense, defense_label
from distillarena.objectives import get_objective
from distillarena.tasks.config import TaskConfig
from distillarena.train.config import ModelRef, ScheduleConfig, TeacherConfig, TrainConfig


def default_proxy() -> ModelRef:
    """The proxy student of PoE and antidistillation: the tiny preset trained briefly on the built-in task."""
    return ModelRef(teach=TeacherConfig(preset="tiny", train=TrainConfig(steps=300, lr=3e-3)))


class DefenseConfig(Strict):
    """One defense at one strength: a kind and its parameters from the table in :mod:`distillarena.defenses.spec`
    (validated when the config loads), and the proxy it runs with if it needs one."""

    kind: DefenseKind = "none"
    params: dict[str, float | int | str] = Field(default_factory=dict,
                                                 description="the kind's parameters (distillarena.defenses.spec)")
    proxy: ModelRef = Field(default_factory=default_proxy, description="used by poe and antidistillation")
    holdout_traces: int = Field(256, ge=1, description="holdout problems for the antidistillation gradient")
    holdout: Literal["teacher", "reference"] = Field("teacher", description="the antidistillation gradient's "
                                                     "holdout texts: the undefended teacher's completions (as the "
                                                     "papers) or the task's reference solutions")

    @model_validator(mode="after")
    def _valid_params(self) -> DefenseConfig:
        check_defense(self.kind, self.params)
        return self

    @property
    def label(self) -> str:
        return defense_label(self.kind, self.params)


class DecodingConfig(Strict):
    """The teacher's own decoding, under every defense: each defense's parameters are laid over it (a temperature
    defense replaces the temperature, PoE samples its mixture at this temperature and top-p). The papers' teacher
    samples at temperature 0.6 with top-p 0.95."""

    temperature: float = Field(1.0, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)

    def params(self) -> dict[str, float]:
        """As defense parameters; settings at their no-op value are left out (labels and cache keys stay short)."""
        out: dict[str, float] = {}
        if self.temperature != 1.0:
            out["temperature"] = self.temperature
        if self.top_p is not None and self.top_p < 1.0:
            out["top_p"] = self.top_p
        return out

    def under(self, defense_params: dict[str, float | int | str]) -> dict[str, float | int | str]:
        """The parameters a defense samples with: this decoding, overridden by the defense's own."""
        return {**self.params(), **defense_params}


class RevealConfig(Strict):
    """What the traces keep of the teacher's distribution, as an API would reveal it."""

    top_k: int | None = Field(None, ge=1, le=20)
    decimals: int | None = Field(None, ge=0)
    noise_std: float = Field(0.0, ge=0)


class PromptsConfig(Strict):
    split: Literal["train", "holdout", "test"] = "train"
    n: int = Field(256, ge=1)
    n_ops: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    seed: int = 0
    samples: int = Field(1, ge=1, description="completions per prompt (consecutive records; self-consistency)")


class TracesConfig(Strict):
    """``distillarena traces``: sample a (defended) teacher on task prompts into a resumable JSON lines file."""

    teacher: ModelRef = Field(default_factory=lambda: ModelRef(teach=TeacherConfig()))
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reveal: RevealConfig = Field(default_factory=RevealConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="the teacher's decoding under "
                                     "the defense (the defense's parameters override it)")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


# --- the distillation game (``distillarena game``) ----------------------------------------------------------------


def default_game_student() -> ModelRef:
    """The attacker's student before it sees any trace: the small preset under-trained on the task (300 steps on 1-
    and 2-operation problems: about 60% / 20% accuracy), so that the teacher's traces have capability to add. (A
    student trained on 1-operation problems only learned 2-operation problems too slowly from a few hundred
    traces for the undefended reference to gain anything, which leaves the recovery undefined.)"""
    return ModelRef(teach=TeacherConfig(preset="small", task=TaskConfig(n_ops=[1, 2]),
                                        train=TrainConfig(steps=300, lr=3e-3, eval_every=0)))


class GameDefense(Strict):
    """One defense kind swept over strengths (each a ``params`` dict of :class:`DefenseConfig`)."""

    kind: DefenseKind = "none"
    strengths: list[dict[str, float | int | str]] = Field(default_factory=lambda: [{}], min_length=1)
    proxy: ModelRef = Field(default_factory=default_proxy, description="used by poe and antidistillation")
    holdout_traces: int = Field(256, ge=1, description="holdout problems for the antidistillation gradient")
    holdout: Literal["teacher", "reference"] = Field("teacher", description="the antidistillation gradient's "
                                                     "holdout texts (see DefenseConfig)")

    @model_validator(mode="after")
    def _valid_strengths(self) -> GameDefense:
        for params in self.strengths:
            check_defense(self.kind, params)
        return self

    def at(self, params: dict[str, float | int | str]) -> DefenseConfig:
        return DefenseConfig(kind=self.kind, params=dict(params), proxy=self.proxy,
                             holdout_traces=self.holdout_traces, holdout=self.holdout)


class AttackerConfig(Strict):
    """The student's use of the traces: a ``kind`` from the attacker table (:mod:`distillarena.attacks.spec`:
    passive, adaptive, filter, value_tilt, verifier_filter, self_consistency, invert_temperature, invert_poe,
    nll_filter) and its parameters, validated when the config loads. Parameters are written flat beside ``kind``
    (``{kind: value_tilt, beta: 0.5}``) or under ``params``; an unknown or bad one is an error naming it.
    ``objective``: the training objective, a registered one that learns from text alone (``sft``) or from
    revealed top-k log-probs (``fkl``, ``rkl``, ``jsd``, ...); default: the kind's own (``sft``; ``fkl`` for the
    inversion attackers, which train on recovered top-k rows)."""

    name: str | None = None
    kind: AttackerKind = "passive"
    params: dict[str, Any] = Field(default_factory=dict, description="the kind's parameters (attacks.spec)")
    objective: str | None = Field(None, description="a registered objective that learns from text alone (sft) or "
                                  "from revealed top-k log-probs (fkl, rkl, jsd, ...); default: the kind's")

    @model_validator(mode="before")
    @classmethod
    def _flat_params(cls, data: Any) -> Any:
        """Gather parameters written beside ``kind`` into ``params`` and validate them against the kind's model,
        errors located at the parameter (``attackers.0.beta``)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        own = set(cls.model_fields)
        flat = {k: data.pop(k) for k in list(data) if k not in own}
        params = dict(data.get("params") or {})
        both = sorted(set(flat) & set(params))
        if both:
            raise ValueError(f"{', '.join(both)} given both beside kind and under params")
        params.update(flat)
        kind = data.get("kind", "passive")
        if kind in ATTACKERS:
            spec = ATTACKERS[kind]
            try:  # kept normalised (every parameter, defaults filled in): labels and keys come from the model
                params = spec.params.model_validate(params).model_dump(mode="json")
            except ValidationError as e:
                details = []
                for err in e.errors():
                    loc = tuple(err["loc"])
                    where = loc if loc and loc[0] in flat else ("params", *loc)
                    msg = (f"attacker {kind!r} does not take it; its parameters are "
                           f"{', '.join(spec.parameter_names())}" if err["type"] == "extra_forbidden"
                           else err["msg"])
                    details.append(InitErrorDetails(type=PydanticCustomError("attacker_param", "{msg}",
                                                                             {"msg": msg}),
                                                    loc=where, input=err.get("input")))
                raise ValidationError.from_exception_data(cls.__name__, details) from None
        data["params"] = params
        return data

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            spec = get_objective(v)
        except UserError as e:
            raise ValueError(str(e)) from None
        if spec.uses_teacher and "topk" not in spec.accepted_signals:
            raise ValueError(f"objective {v!r} cannot learn from revealed top-k log-probs (it takes "
                             f"{', '.join(sorted(spec.accepted_signals))})")
        return v

    @model_validator(mode="after")
    def _objective_fits_kind(self) -> AttackerConfig:
        if self.spec.needs_logprobs and not get_objective(self.training_objective).uses_teacher:
            raise ValueError(f"attacker {self.kind} trains on recovered top-k log-probs: its objective must learn "
                             f"from top-k (fkl, rkl, jsd, ...), not {self.training_objective}")
        if self.spec.samples_param and get_objective(self.training_objective).uses_teacher:
            raise ValueError(f"attacker {self.kind} keeps whole traces by their answers: use a text objective")
        return self

    @property
    def spec(self) -> AttackerSpec:
        return ATTACKERS[self.kind]

    @property
    def p(self) -> Any:
        """The validated parameters (the kind's model, defaults filled in)."""
        return self.spec.params.model_validate(self.params)

    @property
    def training_objective(self) -> str:
        return self.objective or self.spec.objective

    @property
    def learns_from_teacher(self) -> bool:
        """True when it learns from the revealed top-k log-probs, False when from the text alone."""
        return get_objective(self.training_objective).uses_teacher

    @property
    def samples_per_prompt(self) -> int:
        return self.spec.samples_per_prompt(self.p)

    def key_fields(self) -> dict[str, Any]:
        """What determines this attacker's cells (its name does not). The paper's three original kinds keep the
        flat shape their keys always had, so earlier run folders keep their cells."""
        p = self.p
        if isinstance(p, PaperParams):
            return {"kind": self.kind, **p.model_dump(mode="json"), "objective": self.training_objective}
        return {"kind": self.kind, "params": p.model_dump(mode="json"), "objective": self.training_objective}

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = self.spec.label(self.p)
        return base if self.training_objective == self.spec.objective else f"{base}+{self.training_objective}"


class GamePrompts(Strict):
    """The attacker's prompt pool: ``pool`` distinct train-split problems; it queries the first ``budget``. The
    default attacks 2-operation problems: the base student mostly fails them and the teacher mostly solves them, so
    the traces have capability to give (docs/decisions.md, "A game with room to learn")."""

    pool: int = Field(2048, ge=1)
    n_ops: list[int] = Field(default_factory=lambda: [2])
    seed: int = 0


class GameTrainConfig(ScheduleConfig):
    """The attacker's training run (the project's one loop), the same for every cell."""

    steps: int = Field(250, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)


class GameEvalConfig(Strict):
    """The students' test: the same problems for every cell (so effects are paired by problem); 1,000 of them keep
    the standard error of a paired accuracy difference near 0.015."""

    n_problems: int = Field(1000, ge=1, description="test problems for student accuracy (greedy)")
    difficulties: list[int] = Field(default_factory=lambda: [2])
    max_new_tokens: int = Field(64, ge=1)
    entropy_problems: int = Field(64, ge=0, description="test problems for per-position entropies (0: none)")


class OracleConfig(Strict):
    """The oracle check of value-tilting attackers (``adaptive``, ``filter``, ``value_tilt``): the actual
    holdout-loss change after one SGD step (``lr``) on each of ``n_traces`` traces, rank-correlated with the cheap
    value (Spearman, with a bootstrap interval; 0: off; issue 14 asks at least 64). The value is first-order: with
    a tiny ``lr`` the correlation tends to 1 by construction; with a large one the curvature of the loss dominates
    (measurements in docs/decisions.md, "The oracle check's step size")."""

    n_traces: int = Field(64, ge=0)
    lr: float = Field(0.01, gt=0)


def _same_params(a: dict, b: dict) -> bool:
    """Equal defense parameters, numbers compared as numbers (``{top_k: 5}`` is ``{top_k: 5.0}``)."""
    def norm(d: dict) -> dict:
        return {k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in d.items()}

    return norm(a) == norm(b)


class GameAPIKey(Strict):
    """One API key of the served teacher, and the defense its key policy applies: ``defense`` and ``params`` are a
    game defense (``kind`` and ``params`` of :class:`DefenseConfig`), which is also exactly how the server writes a
    key's policy (``distillarena keys create --defense poe --param gamma=0.4``). The game trusts this declaration
    (an API does not say what it applies); it labels the cell, and only a cell of that defense uses the key."""

    key: str | None = Field(None, description="the bearer token (key_env keeps it out of the config file)")
    key_env: str | None = Field(None, description="name of the environment variable holding the token")
    defense: DefenseKind = "none"
    params: dict[str, float | int | str] = Field(default_factory=dict)
    reveals_logprobs: bool = Field(True, description="false: the key's policy reveals no log-probs (its traces "
                                   "are text only; attackers that need log-probs skip its cells, saying so)")

    @model_validator(mode="after")
    def _one_token(self) -> GameAPIKey:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give the key's token as exactly one of key, key_env")
        check_defense(self.defense, self.params)
        return self

    def token(self) -> str:
        if self.key is not None:
            return self.key
        import os

        value = os.environ.get(self.key_env or "")
        if not value:
            raise UserError(f"environment variable {self.key_env} (the API key of defense {self.defense}) is not set")
        return value

    def serves(self, kind: str, params: dict) -> bool:
        """True when this key's declared policy is ``kind`` with exactly ``params`` (the cell's defense laid over
        the game's decoding)."""
        return self.defense == kind and _same_params(self.params, params)


class GameAPI(Strict):
    """Collect the traces from a teacher behind an OpenAI-compatible API (``distillarena serve``, or any server
    with the same extensions) instead of sampling it in process.

    Each cell's defense is applied by the server: a cell uses the key in ``keys`` whose declared defense is the
    cell's (kind and params; one for ``none`` too, the undefended reference), and a defense with no key is a
    config error. The cell's ``proxy`` and ``holdout_traces`` are then the server's business (they only label).
    ``reveal.top_k`` is asked per request (the key's policy must allow it); rounding and noise are the key's (set
    ``reveal.decimals`` / ``noise_std`` to what the key applies, for the labels).

    Every batch of ``batch_size`` prompts is one ``/v1/completions`` request: the prompts as token ids of the local
    teacher's tokenizer, ``seed`` the batch's seed (as in process), temperature 1, ``max_tokens`` =
    ``max_new_tokens``; so the server runs exactly the sampler call of the in-process collection and a cell played
    over HTTP gives the same traces and the same numbers as in process, except what an API cannot reveal: the
    undefended teacher's log-probs, hence ``teacher_kl`` (null over the API). The server must accept
    ``batch_size`` prompts per request (``max_prompts`` of the serve config). ``token_ids`` asks for the sampled
    token ids (``return_tokens_as_token_ids``, vLLM's extension; this project's server reveals the EOS with it);
    ``false`` (a provider without it): text only, the tokens re-encoded from the text, and no top-k.
    """

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the served model's id (GET /v1/models)")
    keys: list[GameAPIKey] = Field(min_length=1)
    token_ids: bool = True
    concurrency: int = Field(4, ge=1, description="requests in flight at most")
    max_retries: int = Field(8, ge=0, description="retries of a request on 429 / 5xx / connection errors")
    timeout: float = Field(600.0, gt=0, description="seconds per request")

    def key_for(self, kind: str, params: dict) -> GameAPIKey:
        for k in self.keys:
            if k.serves(kind, params):
                return k
        raise UserError(f"api.keys has no key for defense {defense_label(kind, params)}: add one whose policy "
                        "applies it")


class DetectConfig(Strict):
    """Detectability, the game's third axis: the radioactivity test (``distillarena.forensics.detect_open``) on
    every trained student. The scheme tested (key, gamma, context) is the game's first watermark defense's (its
    first strength), else the one given here; so the students of every other defense are the test's null cases.
    ``texts``: what the student reads, ``traces`` (the cell's own traces: the provider's log of what it served
    this attacker) or ``reference`` (reference solutions of test problems, the same for every cell)."""

    enabled: bool = True
    texts: Literal["traces", "reference"] = "traces"
    n_texts: int = Field(1024, ge=1, description="texts read (at most the budget with texts: traces)")
    min_entropy: float = Field(0.3, ge=0, description="score only positions where the next-token entropy (of "
                               "gate) is at least this (nats): where the watermark could act at all")
    gate: Literal["teacher", "student"] = Field("teacher", description="whose entropy gates: the undefended "
                                                "teacher's (the defender's own model) or the student's")
    key: str = Field("distillarena", min_length=1, description="used when the game has no watermark defense")
    gamma: float = Field(0.5, gt=0, lt=1)
    context: int = Field(4, ge=1, le=64)


class GameConfig(Strict):
    """``distillarena game``: defenses x strengths x attackers x seeds, one cached cell each.

    With ``api`` (:class:`GameAPI`) the traces come from a served teacher over HTTP; ``teacher`` then names the
    local copy of the served model, used for its tokenizer, the teacher's greedy accuracy and answer forcing."""

    teacher: ModelRef = Field(default_factory=lambda: ModelRef(teach=TeacherConfig()))
    student: ModelRef = Field(default_factory=default_game_student)
    defenses: list[GameDefense] = Field(default_factory=lambda: [
        GameDefense(kind="temperature", strengths=[{"temperature": 1.5}, {"temperature": 2.0}]),
        GameDefense(kind="poe", strengths=[{"gamma": 0.4}, {"gamma": 0.7}]),
    ], min_length=1)
    attackers: list[AttackerConfig] = Field(default_factory=lambda: [
        AttackerConfig(kind="passive"), AttackerConfig(kind="adaptive", beta=1.0)], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    budget: int = Field(1024, ge=1, description="teacher queries (traces) per cell")
    prompts: GamePrompts = Field(default_factory=GamePrompts)
    holdout: int = Field(128, ge=1, description="the attacker's clean holdout examples (reference solutions)")
    reveal: RevealConfig = Field(default_factory=RevealConfig)
    decoding: DecodingConfig = Field(default_factory=lambda: DecodingConfig(temperature=0.7, top_p=0.95),
                                     description="the teacher's decoding under every defense (paper-like); a "
                                     "defense's own parameters override it")
    answer_forcing: bool = Field(False, description="the undefended teacher completes a missing Answer line "
                                                    "(flatters the defense; as in the reference code)")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="teacher sampling batch")
    train: GameTrainConfig = Field(default_factory=GameTrainConfig)
    eval: GameEvalConfig = Field(default_factory=GameEvalConfig)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    api: GameAPI | None = Field(None, description="collect the traces over HTTP from a served teacher (GameAPI)")
    detect: DetectConfig = Field(default_factory=DetectConfig, description="detectability: the radioactivity "
                                 "p-value of every trained student (DetectConfig)")

    @model_validator(mode="after")
    def _consistent(self) -> GameConfig:
        if self.budget > self.prompts.pool:
            raise ValueError(f"budget ({self.budget} queries) is larger than the prompt pool "
                             f"(prompts.pool = {self.prompts.pool}); raise the pool or lower the budget")
        labels = [a.label for a in self.attackers]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"attackers {', '.join(dup)} appear twice; give them distinct settings or names")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        for a in self.attackers:
            if a.samples_per_prompt > self.budget:
                raise ValueError(f"attacker {a.label} asks {a.samples_per_prompt} samples per prompt, more than the "
                                 f"budget ({self.budget} queries)")
            if a.learns_from_teacher and self.reveal.top_k is None:
                raise ValueError(f"attacker {a.label} learns from revealed top-k log-probs: set reveal.top_k")
            if a.learns_from_teacher and self.answer_forcing:
                raise ValueError(f"attacker {a.label}: answer forcing appends text with no revealed log-probs; "
                                 "use objective sft or answer_forcing: false")
        if self.api is not None:
            if self.reveal.top_k is not None and not self.api.token_ids:
                raise ValueError("reveal.top_k over the API needs the sampled token ids: set api.token_ids")
            wanted = [DefenseConfig()] + [d.at(p) for d in self.defenses for p in d.strengths]
            missing = sorted({defense_label(d.kind, self.decoding.under(d.params)) for d in wanted
                              if not any(k.serves(d.kind, self.decoding.under(d.params)) for k in self.api.keys)})
            if missing:
                raise ValueError(f"api.keys has no key for the defenses {', '.join(missing)} (the undefended "
                                 "reference cells need a key of defense none): add a key whose policy applies each")
        return self

