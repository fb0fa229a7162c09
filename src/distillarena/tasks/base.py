"""What the arena needs of a task: prompts with known answers per split and difficulty, and the checkers.

Evaluation, the game's traces and teacher utility, and the demo use a task only through :class:`Task`, so a second
task is one module implementing it plus one entry in :data:`distillarena.tasks.TASKS` (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TaskProblem(Protocol):
    """One problem: what the model sees, the true answer, and its difficulty (a small integer)."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> Any: ...

    @property
    def difficulty(self) -> int: ...

    @property
    def n_solutions(self) -> int:
        """Distinct valid solutions (step orders, swappable operands): > 1 where a teacher has modes to choose."""
        ...


@runtime_checkable
class Task(Protocol):
    """A task with checkable answers.

    answer_prefix:  the text that introduces the final answer (answer forcing appends it to a completion);
    problems:       ``n`` distinct problems of a split (``train`` / ``holdout`` / ``test``, disjoint), seeded, evenly
                    mixing the given difficulties;
    extract_answer: the final answer a completion states, or None;
    check:          the completion's final answer is the problem's;
    step_validity:  the fraction of valid reasoning steps (tasks without checkable steps return None).
    """

    name: str
    answer_prefix: str

    def problems(self, split: str, n: int, difficulty: int | list[int], seed: int = 0) -> list[TaskProblem]: ...

    def extract_answer(self, completion: str) -> Any | None: ...

    def check(self, problem: TaskProblem, completion: str) -> bool: ...

    def step_validity(self, completion: str) -> float | None: ...


__all__ = ["Task", "TaskProblem"]
