"""Configs of training jobs: a teacher trained on the built-in task, a model reference, and a distillation run
(``distillarena teach`` / ``distill`` / ``cache-teacher``)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_serializer, model_validator

from distillarena.core.config import Strict
from distillarena.tasks.config import TaskConfig


class ScheduleConfig(Strict):
    """What every training run sets: length, batch, and the AdamW schedule (warmup, then cosine to
    ``min_lr_ratio``); :meth:`~distillarena.train.loop.LoopConfig.from_settings` reads it."""

    steps: int = Field(700, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)


class TrainConfig(ScheduleConfig):
    grad_accum: int = Field(1, ge=1)
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
        if fields["task"]["commute"] == 0:  # a world without swapped operands keeps the key it had before they existed
            del fields["task"]["commute"]
        blob = json.dumps({"teacher": fields, "tokenizer": tokenizer_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvalConfig(Strict):
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    n_per_difficulty: int = Field(200, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    seed: int = 0



class ModelRef(Strict):
    """A model: a ``save_pretrained`` folder (``path``) or a preset trained on the built-in task (``teach``)."""

    path: str | None = None
    teach: TeacherConfig | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> ModelRef:
        if self.path is not None and self.teach is not None:
            raise ValueError("give path or teach, not both")
        return self


# --- distillation (``distillarena distill`` / ``distillarena cache-teacher``) ---------------------------------

ObjectiveParam = float | int | bool
Dtype = Literal["float32", "bfloat16", "float16"]


class APITeacherConfig(Strict):
    """A teacher behind an OpenAI-compatible ``/v1/completions`` endpoint (vLLM, ``distillarena serve``, a
    provider). Its top-k log-probs are asked once per example and written into a top-k cache (resumable: a paid
    answer is never asked twice); training then reads the cache. ``mode``: ``prompt_logprobs`` (vLLM's, score the
    data), ``echo`` (``echo`` + ``logprobs``, score the data), or with ``seq_kd: true`` the teacher's own answers
    and the top-k it reveals for each of their tokens."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the served model's id")
    key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                                "(None: send no key)")
    top_logprobs: int = Field(20, ge=1, le=20, description="alternatives per position: the k of the cache")
    mode: Literal["prompt_logprobs", "echo"] = "prompt_logprobs"
    tokenizer: str | None = Field(None, description="the teacher's tokenizer (folder or hub id; default: model)")
    vocab_size: int | None = Field(None, ge=1, description="the teacher's vocabulary (default: the tokenizer's)")
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(8, ge=0)
    timeout: float = Field(120.0, gt=0)
    budget_tokens: int | None = Field(None, ge=0, description="tokens the teacher may bill for this cache, "
                                      "over every run (None: unlimited)")
    budget_requests: int | None = Field(None, ge=0, description="requests likewise")
    cache: str | None = Field(None, description="where the top-k cache is written (default: under the cache "
                              "dir, keyed by teacher and data)")
    bits: Literal[8, 16] = 8


class TeacherSource(Strict):
    """Where the teacher's signal comes from. One of ``teach`` (the built-in teacher, trained once and cached;
    the default), ``path`` (any ``save_pretrained`` folder or hub id), ``api`` (a served teacher's top-k log-probs,
    asked once into a top-k cache: :class:`APITeacherConfig`) or ``text: true`` (the data's completions are the
    teacher's text: SFT / sequence KD only). ``cache`` (a top-k cache written by
    ``distillarena cache-teacher``) replaces the live teacher in training; given together with ``path`` or
    ``teach``, that model is used only to check the cache's identity and for the held-out KL."""

    teach: TeacherConfig | None = None
    path: str | None = None
    cache: str | None = None
    text: bool = False
    api: APITeacherConfig | None = None
    dtype: Dtype = Field("float32", description="the live teacher's dtype")
    device: str | None = Field(None, description="the live teacher's device (default: the student's)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSource:
        given = [n for n, v in (("teach", self.teach), ("path", self.path), ("text", self.text or None),
                                ("api", self.api)) if v]
        if len(given) > 1:
            raise ValueError(f"give only one of teach, path, text, api (got {', '.join(given)})")
        if self.api is not None and self.cache:
            raise ValueError("an API teacher writes its own top-k cache: set api.cache, not cache")
        if self.text and self.cache:
            raise ValueError("a text-only teacher has no top-k cache; remove cache or text")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)  # api is left out while unset: older configs dump (and resume) as before
        if isinstance(out, dict) and out.get("api", 0) is None:
            out.pop("api")
        return out

    @property
    def kind(self) -> str:
        """'text', 'topk' (a cache, or an API teacher's) or 'model' (a live model)."""
        return "text" if self.text else "topk" if self.cache or self.api else "model"

    def model_ref(self) -> ModelRef | None:
        """The live teacher as a model reference (``path``, or the built-in teacher), if there is one."""
        if self.path is not None:
            return ModelRef(path=self.path)
        builtin = self.builtin_teacher()
        return ModelRef(teach=builtin) if builtin is not None else None

    def builtin_teacher(self) -> TeacherConfig | None:
        """The built-in teacher to train or reuse, if no other model is named."""
        if self.teach is not None:
            return self.teach
        if self.path is None and not self.text and self.cache is None and self.api is None:
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
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="training precision: bfloat16 keeps float32 master weights and optimizer state "
        "and runs the forward, the loss and on-policy sampling under bfloat16 autocast")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (less memory, "
        "about a third more compute)")

    @model_validator(mode="after")
    def _one_init(self) -> StudentConfig:
        given = [n for n in ("path", "from_teacher") if getattr(self, n) is not None]
        # a preset other than the default (a dumped config repeats the default preset beside path / from_teacher)
        if "preset" in self.model_fields_set and self.preset != type(self).model_fields["preset"].default:
            given.append("preset")
        if len(given) > 1:
            raise ValueError(f"give only one of preset, path, from_teacher (got {', '.join(given)})")
        return self

    @property
    def init(self) -> str:
        return "path" if self.path else "from_teacher" if self.from_teacher else "preset"

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # precision fields at their defaults are left out of a dump, so older run folders resume unchanged
        out = handler(self)
        if isinstance(out, dict):
            for name in ("dtype", "gradient_checkpointing"):
                if name in out and out[name] == type(self).model_fields[name].default:
                    out.pop(name)
        return out


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


class CrossTokenizerConfig(Strict):
    """A student whose tokenizer differs from the teacher's (``student.tokenizer``, or a pretrained ``student.path``).
    Every example is encoded in both tokenizations of its text; the teacher's signal is lined up with the
    student's positions by character offsets (``pairing: offsets``) or by index (``position``, as the ULD paper
    does). Objectives: those made for it (``uld``, ``aligned``), or ``sft`` on the teacher's text (``seq_kd``)."""

    pairing: Literal["offsets", "position"] = "offsets"


class PushToHubConfig(Strict):
    """Upload the trained student (``student/``: a plain ``save_pretrained`` folder with its tokenizer) to a model
    repository at the end of the run. Needs the network: refused before training while ``HF_HUB_OFFLINE`` is set."""

    repo_id: str = Field(description="e.g. your-name/smollm2-8l-distilled")
    private: bool = False
    token_env: str | None = Field("HF_TOKEN", description="environment variable holding a write token (None, "
                                  "or the variable unset: the token of `hf auth login`)")
    commit_message: str = "Upload a student distilled with distillarena"


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
    cross_tokenizer: CrossTokenizerConfig | None = Field(
        None, description="the student's tokenizer differs from the teacher's (objectives uld, aligned, sft)")
    stages: list[StageConfig] = Field(default_factory=list)
    train: DistillTrainConfig = Field(default_factory=DistillTrainConfig)
    eval: DistillEvalConfig = Field(default_factory=DistillEvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    push_to_hub: PushToHubConfig | None = None

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

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # cross_tokenizer is left out of a dump while unset, so configs without it dump (and resume, and key
        # their caches) exactly as before the field existed
        out = handler(self)
        for name in ("cross_tokenizer", "push_to_hub"):
            if isinstance(out, dict) and out.get(name, 0) is None:
                out.pop(name)
        return out

