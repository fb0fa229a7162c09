"""Built-in tasks, data loading and answer checking. :data:`TASKS` is the table of tasks by name (each a
:class:`~distillarena.tasks.base.Task`); :class:`~distillarena.tasks.config.TaskConfig` builds the configured one."""

from distillarena.tasks.arithmetic import ArithmeticTask
from distillarena.tasks.base import Task, TaskProblem

TASKS: dict[str, type] = {"arithmetic": ArithmeticTask}

__all__ = ["TASKS", "Task", "TaskProblem"]
