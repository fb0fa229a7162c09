"""Off a terminal, progress is plain periodic lines (rich draws nothing there while a live bar runs)."""

import io

from rich.console import Console

from distillarena.core.progress import LineProgress, progress


def test_progress_prints_lines_off_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    bar = progress(console, every_s=0.0)
    assert isinstance(bar, LineProgress)
    with bar:
        t = bar.add_task("teacher base", total=4, status="")
        bar.update(t, completed=2, status="loss 1.5")
        bar.advance(t, 2)
    lines = buf.getvalue().splitlines()
    assert lines == ["teacher base: 2/4 (0s) loss 1.5", "teacher base: 4/4 (0s) loss 1.5"]


def test_progress_is_throttled_but_always_reports_completion():
    buf = io.StringIO()
    bar = LineProgress(Console(file=buf, force_terminal=False, width=200), every_s=3600)
    t = bar.add_task("distill", total=3, status="")
    bar.update(t, completed=1)
    bar.update(t, completed=2)
    bar.update(t, completed=3)
    assert buf.getvalue().splitlines() == ["distill: 3/3 (0s)"]


def test_progress_is_a_rich_bar_on_a_terminal():
    assert not isinstance(progress(Console(file=io.StringIO(), force_terminal=True)), LineProgress)
