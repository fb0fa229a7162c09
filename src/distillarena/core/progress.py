"""Progress for long jobs: a live rich bar in a terminal, plain periodic lines otherwise.

rich draws nothing while a live bar runs on a console that is not a terminal (``make demo | tee log``, CI, a
notebook's captured output), which made a 5-minute teacher run look hung. Off a terminal, ``progress`` prints one
line per task at most every ``every_s`` seconds, and one when the task completes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class LineProgress:
    """The part of ``rich.progress.Progress`` the recipes use, printing plain lines."""

    def __init__(self, console: Console, every_s: float = 15.0):
        self.console = console
        self.every_s = every_s
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        tid = len(self.tasks)
        now = time.perf_counter()
        self.tasks[tid] = {"description": description, "total": total, "completed": completed, "fields": fields,
                           "start": now, "printed": now, "done": False}
        return tid

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None,
               **fields: Any) -> None:
        t = self.tasks[task_id]
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        t["fields"].update({k: v for k, v in fields.items() if k not in ("total", "description")})
        now = time.perf_counter()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if (finished and not t["done"]) or now - t["printed"] >= self.every_s:
            t["printed"] = now
            t["done"] = finished
            total = f"/{t['total']:.0f}" if t["total"] is not None else ""
            status = t["fields"].get("status", "")
            self.console.print(f"{t['description']}: {t['completed']:.0f}{total} "
                               f"({now - t['start']:.0f}s) {status}".rstrip(), highlight=False)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)


def progress(console: Console, every_s: float = 15.0) -> Progress | LineProgress:
    """A bar with a free ``status`` field (pass ``status=""`` to ``add_task``)."""
    if not console.is_terminal:
        return LineProgress(console, every_s)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=False)
