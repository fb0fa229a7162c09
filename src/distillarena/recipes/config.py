"""The demo's config (``distillarena demo``): the whole story in one run."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from distillarena.core.config import Strict
from distillarena.game.config import (
    AttackerConfig,
    GameConfig,
    GameDefense,
    GameEvalConfig,
    GamePrompts,
    GameTrainConfig,
    OracleConfig,
)
from distillarena.train.config import (
    DataConfig,
    DistillEvalConfig,
    DistillTrainConfig,
    EvalConfig,
    FromTeacher,
    ModelRef,
    StudentConfig,
    TeacherConfig,
)

DEMO_OBJECTIVES = ("hpd", "sft", "seqkd")  # examples/findings.yaml adds one-hot reverse KL and JSD


class DemoDistillConfig(Strict):
    """The demo's distillation comparison: each objective distills the demo's teacher into the same student, on the
    same data, with the same steps and seeds (the HPD paper's baselines as run: SFT, SeqKD, one-hot reverse KL and
    JSD, all off-policy on the data's prefixes). The default student is the teacher with every other layer dropped
    (it holds the skill in its layers, so distillation lifts it far), trained for many epochs on a small fixed set,
    where the HPD paper saw SFT collapse onto one mode (docs/decisions.md, "The demo's distillation regime").
    ``student: null`` starts from the game's student before any trace instead."""

    objectives: list[str] = Field(default_factory=lambda: list(DEMO_OBJECTIVES), min_length=1)
    student: StudentConfig | None = Field(default_factory=lambda: StudentConfig(from_teacher=FromTeacher(keep_every=2)))
    data: DataConfig = Field(default_factory=lambda: DataConfig(train_size=512))
    train: DistillTrainConfig = Field(default_factory=lambda: DistillTrainConfig(steps=320, eval_every=80, lr=1e-3,
                                                                                 warmup_steps=20))
    eval: DistillEvalConfig = Field(default_factory=lambda: DistillEvalConfig(n_examples=64, n_problems=300))
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("objectives", "seeds")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("entries must be distinct")
        return v


def _demo_distill_defaults() -> dict[str, Any]:
    d = DemoDistillConfig()
    out = d.model_dump(mode="json", exclude={"data": {"task"}})
    if d.student is not None:  # only the fields the default sets (a dumped preset would clash with from_teacher)
        out["student"] = d.student.model_dump(mode="json", exclude_unset=True)
    return out


def demo_game() -> GameConfig:
    """The demo's game: no defense, one temperature and one PoE strength, one seed, 2-operation prompts and 1,000
    2-operation test problems (where the base student has room to learn), the teacher the demo's own (``teacher``
    is filled in from it). Attackers: passive; the paper's adaptive student (beta 0.5, not 1: at beta 1 a few traces
    carry most of the weight; docs/decisions.md, "The demo's adaptive beta"); the competent value tilt; and the
    verifier filter (rejection sampling on the final answer), so that the report's worst case over attackers has
    an attacker a defender must fear. (The inversion attackers need revealed log-probs, self-consistency a second
    trace collection: ``examples/game-attackers.yaml`` plays them all.)"""
    return GameConfig(
        defenses=[GameDefense(kind="temperature", strengths=[{"temperature": 1.6}]),
                  GameDefense(kind="poe", strengths=[{"gamma": 0.5}])],
        attackers=[AttackerConfig(kind="passive"), AttackerConfig(kind="adaptive", beta=0.5),
                   AttackerConfig(kind="value_tilt"), AttackerConfig(kind="verifier_filter")],
        seeds=[0], budget=1024, prompts=GamePrompts(pool=2048),
        train=GameTrainConfig(steps=200), eval=GameEvalConfig(entropy_problems=32),
        oracle=OracleConfig(n_traces=64, lr=1e-3))


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
                        "distill": _demo_distill_defaults}
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
