"""The built-in task's YAML section."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from distillarena.core.config import Strict
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask


class TaskConfig(Strict):
    """The built-in arithmetic task (defaults: every number two digits wide; see ``ArithmeticConfig``)."""

    n_ops: list[int] = Field(default_factory=lambda: [1, 2, 3], description="difficulties trained on")
    add_min: int = Field(10, ge=0)
    add_max: int = Field(60, ge=1, le=999)
    mul_max: int = Field(9, ge=2, le=99)
    min_value: int = Field(10, ge=0)
    max_value: int = Field(99, ge=10)
    word_fraction: float = Field(0.0, ge=0.0, le=1.0)
    commute: float = Field(0.5, ge=0.0, le=1.0, description="probability that a training solution writes its first "
                           "step (a + or a *) with the operands swapped: a choice between two modes at the first token")

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
                                word_fraction=self.word_fraction, commute=self.commute)

    def build(self) -> ArithmeticTask:
        """The task these settings describe (a :class:`~distillarena.tasks.base.Task`)."""
        return ArithmeticTask(self.arithmetic())
