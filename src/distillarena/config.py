"""YAML configs validated by pydantic. Every field has a default that works on the built-in world;
an unknown or ill-typed field is an error that names the field and the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .tasks.arithmetic import ArithmeticConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Strict):
    """The built-in arithmetic task (defaults: every number two digits wide; see ``ArithmeticConfig``)."""

    n_ops: list[int] = Field(default_factory=lambda: [1, 2, 3], description="difficulties trained on")
    add_min: int = Field(10, ge=0)
    add_max: int = Field(60, ge=1, le=999)
    mul_max: int = Field(9, ge=2, le=99)
    min_value: int = Field(10, ge=0)
    max_value: int = Field(99, ge=10)
    word_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("n_ops")
    @classmethod
    def _ops_in_range(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= k <= 4 for k in v):
            raise ValueError("each number of operations must be between 1 and 4, and the list non-empty")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> TaskConfig:
        if self.add_min > self.add_max or self.min_value > self.max_value:
            raise ValueError("add_min must be <= add_max and min_value <= max_value")
        return self

    def arithmetic(self) -> ArithmeticConfig:
        return ArithmeticConfig(add_min=self.add_min, add_max=self.add_max, mul_max=self.mul_max,
                                min_value=self.min_value, max_value=self.max_value,
                                word_fraction=self.word_fraction)


class TrainConfig(Strict):
    steps: int = Field(700, ge=1)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
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
        # how often we log or evaluate does not change the weights, so it does not change the key
        fields = self.model_dump(exclude={"train": {"log_every", "eval_every"}})
        blob = json.dumps({"teacher": fields, "tokenizer": tokenizer_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvalConfig(Strict):
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    n_per_difficulty: int = Field(200, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0


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


# --- distillation (``distillarena distill`` / ``distillarena cache-teacher``) ---------------------------------

ObjectiveParam = float | int | bool
Dtype = Literal["float32", "bfloat16", "float16"]


class TeacherSource(Strict):
    """Where the teacher's signal comes from. One of ``teach`` (the built-in teacher, trained once and cached;
    the default), ``path`` (any ``save_pretrained`` folder or cached hub id) or ``text: true`` (the data's
    completions are the teacher's text: SFT / sequence KD only). ``cache`` (a top-k cache written by
    ``distillarena cache-teacher``) replaces the live teacher in training; given together with ``path`` or
    ``teach``, that model is used only to check the cache's identity and for the held-out KL."""

    teach: TeacherConfig | None = None
    path: str | None = None
    cache: str | None = None
    text: bool = False
    dtype: Dtype = Field("float32", description="the live teacher's dtype")
    device: str | None = Field(None, description="the live teacher's device (default: the student's)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSource:
        given = [n for n, v in (("teach", self.teach), ("path", self.path), ("text", self.text or None)) if v]
        if len(given) > 1:
            raise ValueError(f"give only one of teach, path, text (got {', '.join(given)})")
        if self.text and self.cache:
            raise ValueError("a text-only teacher has no top-k cache; remove cache or text")
        return self

    @property
    def kind(self) -> str:
        """'text', 'topk' (a cache) or 'model' (a live model)."""
        return "text" if self.text else "topk" if self.cache else "model"

    def builtin_teacher(self) -> TeacherConfig | None:
        """The built-in teacher to train or reuse, if no other model is named."""
        if self.teach is not None:
            return self.teach
        if self.path is None and not self.text and self.cache is None:
            return TeacherConfig()
        return None


class LoraSettings(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class FromTeacher(Strict):
    keep_every: int = Field(2, ge=1, description="keep layers 0, k, 2k, ... of the teacher")


class StudentConfig(Strict):
    """The student: a preset from scratch (default), a pretrained ``path``, or ``from_teacher`` (a copy of the
    teacher keeping every k-th layer); optionally with LoRA adapters (``lora``)."""

    preset: str = "small"
    path: str | None = None
    from_teacher: FromTeacher | None = None
    tokenizer: str | None = Field(None, description="tokenizer of a preset student (default: the teacher's)")
    seed: int = 0
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _one_init(self) -> StudentConfig:
        given = [n for n in ("path", "from_teacher") if getattr(self, n) is not None]
        if "preset" in self.model_fields_set:
            given.append("preset")
        if len(given) > 1:
            raise ValueError(f"give only one of preset, path, from_teacher (got {', '.join(given)})")
        return self

    @property
    def init(self) -> str:
        return "path" if self.path else "from_teacher" if self.from_teacher else "preset"


class DataConfig(Strict):
    """Training data: the built-in task (``source: builtin``) or user data (JSON lines, JSON, parquet, a
    ``save_to_disk`` folder or a cached dataset id) with prompt/completion or chat messages (optional weight)."""

    source: str = "builtin"
    task: TaskConfig = Field(default_factory=TaskConfig)
    train_size: int = Field(4096, ge=1, description="examples in the (finite, reshuffled every epoch) pool")
    eval_source: str | None = Field(None, description="held-out user data (default: the tail of source)")
    probes: dict[str, str] = Field(default_factory=dict, description="more held-out sets (name: data path), each "
                                   "scored like eval_source; metrics prefixed '<name>/'")
    max_length: int | None = Field(None, ge=2, description="longest sequence (default: the models' context)")


class DistillEvalConfig(Strict):
    """Held-out evaluation, every ``train.eval_every`` steps and at the end."""

    n_examples: int = Field(64, ge=0, description="held-out sequences for the teacher-forced KL and entropies")
    n_problems: int = Field(100, ge=0, description="held-out problems for task accuracy (built-in task only)")
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3])
    max_new_tokens: int = Field(64, ge=1)


class CheckpointConfig(Strict):
    every: int = Field(50, ge=0, description="steps between checkpoints (0: only the last step)")
    keep: int = Field(2, ge=0, description="newest checkpoints kept (0: all)")


class LoggingConfig(Strict):
    tensorboard: bool | None = Field(None, description="None: when the tensorboard package is installed")
    wandb: bool = False


class StageConfig(Strict):
    """One stage of a schedule; unset fields inherit the top-level value."""

    steps: int = Field(ge=1)
    objective: str | None = None
    objective_params: dict[str, ObjectiveParam] | None = None
    beta: float | None = Field(None, ge=0, le=1)
    lmbda: float | None = Field(None, ge=0, le=1)
    seq_kd: bool | None = None


class DistillTrainConfig(TrainConfig):
    """The loop's settings for distillation. The *global* batch is ``batch_size x grad_accum`` sequences, whatever
    the number of processes: under N processes each runs ``grad_accum / N`` micro-batches per step."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=0, description="held-out evaluation every N steps (0: only at the end)")


class DistillConfig(Strict):
    """``distillarena distill``. Names follow TRL's GKDConfig where they overlap: ``lmbda`` (probability that a
    micro-batch is replaced by student samples, on-policy), ``seq_kd`` (completions generated by the teacher),
    ``beta`` (generalized JSD interpolation), ``temperature`` (the *sampling* temperature of on-policy and
    seq_kd generations, as in TRL), ``max_new_tokens``. ``loss_temperature`` divides both models' logits in the
    loss. The HPD regime is ``objective: hpd`` on off-policy data (one student sample per position, no
    rollout). ``stages`` runs a schedule (e.g. HPD, then on-policy) in one run and one loop."""

    teacher: TeacherSource = Field(default_factory=TeacherSource)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: str = "hpd"
    objective_params: dict[str, ObjectiveParam] = Field(default_factory=dict)
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD beta (objectives that take one)")
    lmbda: float = Field(0.0, ge=0, le=1, description="probability of an on-policy micro-batch")
    seq_kd: bool = False
    temperature: float = Field(1.0, ge=0, description="sampling temperature of generations (0: greedy)")
    loss_temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, ge=1)
    align_vocab: bool = Field(False, description="allow a padded vocabulary (same tokenizer, more rows)")
    stages: list[StageConfig] = Field(default_factory=list)
    train: DistillTrainConfig = Field(default_factory=DistillTrainConfig)
    eval: DistillEvalConfig = Field(default_factory=DistillEvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _steps_agree(self) -> DistillConfig:
        if self.stages and "steps" in self.train.model_fields_set:
            total = sum(s.steps for s in self.stages)
            if total != self.train.steps:
                raise ValueError(f"train.steps ({self.train.steps}) differs from the sum of the stages' steps "
                                 f"({total}); leave train.steps out when stages are given")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages) if self.stages else self.train.steps


# --- defended decoding (``distillarena traces``) ---------------------------------------------------------------

DefenseKind = Literal["none", "temperature", "truncation", "poe", "antidistillation"]


class ModelRef(Strict):
    """A model: a ``save_pretrained`` folder (``path``) or a preset trained on the built-in task (``teach``)."""

    path: str | None = None
    teach: TeacherConfig | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> ModelRef:
        if self.path is not None and self.teach is not None:
            raise ValueError("give path or teach, not both")
        return self


def default_proxy() -> ModelRef:
    """The proxy student of PoE and antidistillation: the tiny preset trained briefly on the built-in task."""
    return ModelRef(teach=TeacherConfig(preset="tiny", train=TrainConfig(steps=300, lr=3e-3)))


class DefenseConfig(Strict):
    """One defense at one strength (see ``distillarena.defenses.policy`` for what each kind samples)."""

    kind: DefenseKind = "none"
    params: dict[str, float | int | str] = Field(default_factory=dict,
                                                 description="temperature, top_k, top_p, gamma, lam, method, eps")
    proxy: ModelRef = Field(default_factory=default_proxy, description="used by poe and antidistillation")
    holdout_traces: int = Field(256, ge=1, description="holdout problems for the antidistillation gradient")


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


class TracesConfig(Strict):
    """``distillarena traces``: sample a (defended) teacher on task prompts into a resumable JSON lines file."""

    teacher: ModelRef = Field(default_factory=lambda: ModelRef(teach=TeacherConfig()))
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    reveal: RevealConfig = Field(default_factory=RevealConfig)
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

    def at(self, params: dict[str, float | int | str]) -> DefenseConfig:
        return DefenseConfig(kind=self.kind, params=dict(params), proxy=self.proxy,
                             holdout_traces=self.holdout_traces)


class AttackerConfig(Strict):
    """The student's use of the traces. ``passive``: uniform weights. ``adaptive``: weights ``exp(beta * sign *
    clip(z))`` from the finite-difference value of each trace (``z`` standardised, clipped to ``[-clip, clip]``,
    weights normalised to mean 1; ``sign: 1`` upweights traces whose training lowers the student's holdout loss,
    ``sign: -1`` reproduces the reference code). ``filter``: keep the ``keep`` fraction of highest value, uniform
    weights. ``objective``: ``sft`` (weighted SFT on the text) or ``fkl`` (forward KL to the revealed top-k
    log-probs, weighted the same way; needs ``reveal.top_k``)."""

    name: str | None = None
    kind: Literal["passive", "adaptive", "filter"] = "passive"
    beta: float = Field(1.0, ge=0)
    sign: Literal[1, -1] = 1
    clip: float = Field(3.0, gt=0)
    standardize: bool = True
    eps: float = Field(1e-2, gt=0, description="finite-difference step along the unit holdout gradient")
    keep: float = Field(0.5, gt=0, le=1, description="fraction kept by the filter")
    objective: Literal["sft", "fkl"] = "sft"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "passive":
            base = "passive"
        elif self.kind == "adaptive":
            base = f"adaptive(beta={self.beta:g}{'' if self.sign == 1 else ', sign=-1'})"
        else:
            base = f"filter(keep={self.keep:g}{'' if self.sign == 1 else ', sign=-1'})"
        return base if self.objective == "sft" else f"{base}+{self.objective}"


class GamePrompts(Strict):
    """The attacker's prompt pool: ``pool`` distinct train-split problems; it queries the first ``budget``."""

    pool: int = Field(2048, ge=1)
    n_ops: list[int] = Field(default_factory=lambda: [1, 2])
    seed: int = 0


class GameTrainConfig(Strict):
    """The attacker's training run (the project's one loop), the same for every cell."""

    steps: int = Field(250, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)


class GameEvalConfig(Strict):
    n_problems: int = Field(200, ge=1, description="test problems for student accuracy (greedy)")
    difficulties: list[int] = Field(default_factory=lambda: [1, 2])
    max_new_tokens: int = Field(64, ge=1)
    entropy_problems: int = Field(64, ge=0, description="test problems for per-position entropies (0: none)")


class OracleConfig(Strict):
    """The oracle check of adaptive attackers: the actual holdout-loss change after one SGD step (``lr``) on each
    of ``n_traces`` traces, rank-correlated with the cheap value (0: off). The value is first-order: with a tiny
    ``lr`` the correlation tends to 1 by construction; with a large one the curvature of the loss dominates (measured
    on the built-in world, 32 traces: 0.75-0.99 at lr 1e-3, -0.43 to +0.85 at 1e-2, -0.26 to +0.19 at 5e-2,
    depending on the student)."""

    n_traces: int = Field(32, ge=0)
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

    @model_validator(mode="after")
    def _one_token(self) -> GameAPIKey:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give the key's token as exactly one of key, key_env")
        return self

    def token(self) -> str:
        if self.key is not None:
            return self.key
        import os

        value = os.environ.get(self.key_env or "")
        if not value:
            raise UserError(f"environment variable {self.key_env} (the API key of defense {self.defense}) is not set")
        return value

    def serves(self, d: DefenseConfig) -> bool:
        return self.defense == d.kind and _same_params(self.params, d.params)


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

    def key_for(self, d: DefenseConfig) -> GameAPIKey:
        for k in self.keys:
            if k.serves(d):
                return k
        params = ", ".join(f"{k}={v}" for k, v in sorted(d.params.items()))
        raise UserError(f"api.keys has no key for defense {d.kind}({params}): add one whose policy applies it")


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
    answer_forcing: bool = Field(False, description="the undefended teacher completes a missing Answer line "
                                                    "(flatters the defense; as in the reference code)")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="teacher sampling batch")
    train: GameTrainConfig = Field(default_factory=GameTrainConfig)
    eval: GameEvalConfig = Field(default_factory=GameEvalConfig)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    api: GameAPI | None = Field(None, description="collect the traces over HTTP from a served teacher (GameAPI)")

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
            if a.objective == "fkl" and self.reveal.top_k is None:
                raise ValueError(f"attacker {a.label} learns from revealed top-k log-probs: set reveal.top_k")
            if a.objective == "fkl" and self.answer_forcing:
                raise ValueError(f"attacker {a.label}: answer forcing appends text with no revealed log-probs; "
                                 "use objective sft or answer_forcing: false")
        if self.api is not None:
            if self.reveal.top_k is not None and not self.api.token_ids:
                raise ValueError("reveal.top_k over the API needs the sampled token ids: set api.token_ids")
            wanted = [DefenseConfig()] + [d.at(p) for d in self.defenses for p in d.strengths]
            missing = sorted({f"{d.kind}{d.params or ''}" for d in wanted
                              if not any(k.serves(d) for k in self.api.keys)})
            if missing:
                raise ValueError(f"api.keys has no key for the defenses {', '.join(missing)} (the undefended "
                                 "reference cells need a key of defense none): add a key whose policy applies each")
        return self


# --- the demo (``distillarena demo``) ------------------------------------------------------------------------------


DEMO_OBJECTIVES = ("hpd", "sft", "seqkd", "rkl_onehot", "jsd_onehot")


class DemoDistillConfig(Strict):
    """The demo's distillation comparison: each objective distills the demo's teacher into the same student, on the
    same data, with the same steps and seeds (the HPD paper's baselines as run: SFT, SeqKD, one-hot reverse KL and
    JSD, all off-policy on the data's prefixes). ``student: null`` (the default) starts from the game's student
    before any trace (the small preset under-trained on 1- and 2-operation problems), so a few hundred steps show
    a difference; a student from scratch needs far more steps to leave zero accuracy."""

    objectives: list[str] = Field(default_factory=lambda: list(DEMO_OBJECTIVES), min_length=1)
    student: StudentConfig | None = None
    data: DataConfig = Field(default_factory=lambda: DataConfig(train_size=2048))
    train: DistillTrainConfig = Field(default_factory=lambda: DistillTrainConfig(steps=100, eval_every=25, lr=2e-3,
                                                                                 warmup_steps=10))
    eval: DistillEvalConfig = Field(default_factory=lambda: DistillEvalConfig(n_examples=64, n_problems=240))
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("objectives", "seeds")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("entries must be distinct")
        return v


def demo_game() -> GameConfig:
    """The demo's game: no defense, one temperature and one PoE strength (of about the same teacher utility, so
    the two can be compared), passive and adaptive students, one seed, sized to run in about two minutes (the
    teacher is the demo's own: ``teacher`` is filled in from it). The adaptive student's beta is 0.5: at beta 1
    a few traces carry most of the weight (effective sample size about a quarter of the budget) and, on this world,
    the student learns less from undefended traces than the base student knew, which leaves its recovery
    undefined (measured: accuracy 0.36 at beta 1, 0.48 at 0.5, 0.49 at 0.25, passive 0.54, base 0.43)."""
    return GameConfig(
        defenses=[GameDefense(kind="temperature", strengths=[{"temperature": 1.6}]),
                  GameDefense(kind="poe", strengths=[{"gamma": 0.5}])],
        attackers=[AttackerConfig(kind="passive"), AttackerConfig(kind="adaptive", beta=0.5)],
        seeds=[0], budget=512, prompts=GamePrompts(pool=1024),
        train=GameTrainConfig(steps=100), eval=GameEvalConfig(n_problems=400, entropy_problems=32),
        oracle=OracleConfig(n_traces=16, lr=1e-3))


class DemoConfig(Strict):
    """``distillarena demo``: the whole story on the built-in world: the teacher, distillation with HPD against
    the baselines, the game, and the findings, in one run folder with one report."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distill: DemoDistillConfig | None = Field(default_factory=DemoDistillConfig, description="null: skip")
    game: GameConfig | None = Field(default_factory=demo_game, description="null: skip")

    @model_validator(mode="before")
    @classmethod
    def _over_demo_defaults(cls, data: Any) -> Any:
        # A `game:` or `distill:` section changes the demo's own (smaller) defaults, not those of `distillarena
        # game`: each field given replaces that field of demo_game() / DemoDistillConfig() whole (a given
        # `train:` replaces the whole train section; one level only, so `student: {path: ...}` cannot mix with
        # the default's `teach`).
        if isinstance(data, dict):
            data = dict(data)
            defaults = {"game": lambda: demo_game().model_dump(mode="json", exclude={"teacher"}),
                        "distill": lambda: DemoDistillConfig().model_dump(mode="json", exclude={"data": {"task"}})}
            for name, base in defaults.items():
                if isinstance(data.get(name), dict):
                    data[name] = {**base(), **data[name]}
        return data

    @model_validator(mode="after")
    def _one_teacher(self) -> DemoConfig:
        if self.game is not None:
            mine = ModelRef(teach=self.teacher)
            if "teacher" in self.game.model_fields_set and self.game.teacher != mine:
                raise ValueError("game.teacher differs from the demo's teacher: the demo plays the game with its own "
                                 "teacher (set `teacher`, and leave game.teacher out)")
            self.game.teacher = mine
        if self.distill is not None and "task" not in self.distill.data.model_fields_set:
            self.distill.data.task = self.teacher.task  # distill on the teacher's task unless told otherwise
        return self
