"""``distillarena demo``: the whole story on the built-in world, in one run folder with a report.

Today: train (or reuse) the teacher, evaluate it by difficulty, measure its per-position entropy, and
write ``report.html``. Distillation and the game join this recipe as they land.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import matplotlib.pyplot as plt
from rich.console import Console

from ..config import DemoConfig, dump_config
from ..errors import UserError
from ..evaluate.task_eval import evaluate_problems, per_position_entropy
from ..models.presets import load_model, load_tokenizer
from ..paths import JsonlWriter, atomic_write_json, atomic_write_text
from ..tasks.arithmetic import ArithmeticTask
from .report import Report
from .teach import PROBE_DIFFICULTY, TeacherResult, task_config, teach


def new_run_dir(root: Path, job: str, out: Path | None, overwrite: bool) -> Path:
    if out is None:
        out = Path(root) / f"{job}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"run folder {out} already exists and is not empty; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_demo(cfg: DemoConfig, out: Path, console: Console | None = None) -> Path:
    console = console or Console()
    t0 = time.perf_counter()
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    metrics = JsonlWriter(out / "metrics.jsonl")

    console.rule("[bold]1. Teacher")
    teacher = teach(cfg.teacher, console=console)
    for rec in teacher.log:
        metrics.write({"phase": "teacher_train", **rec})
    model = load_model(str(teacher.path))
    tok = load_tokenizer(str(teacher.path))

    console.rule("[bold]2. Teacher evaluation")
    task = ArithmeticTask(task_config(cfg.teacher))
    test = task.problems("test", cfg.eval.n_per_difficulty * len(cfg.eval.difficulties),
                         cfg.eval.difficulties, seed=cfg.eval.seed)
    ev = evaluate_problems(model, tok, test, max_new_tokens=cfg.eval.max_new_tokens)
    for k, v in ev.by_difficulty.items():
        console.print(f"  {k} operation(s): accuracy {v['accuracy']:.1%}, step validity "
                      f"{v['step_validity']:.1%} (n={v['n']})")
        metrics.write({"phase": "teacher_eval", "difficulty": k, **v})
    entropy = per_position_entropy(model, tok, [p for p in test if p.n_ops >= 3])
    metrics.write({"phase": "teacher_entropy", **entropy})
    metrics.close()

    summary = {"teacher": str(teacher.path), "teacher_cached": teacher.cached,
               "teacher_eval": ev.as_dict(), "wall_seconds": time.perf_counter() - t0}
    atomic_write_json(out / "summary.json", summary)
    report = build_report(cfg, teacher, ev, entropy, summary)
    path = report.write(out / "report.html")
    console.print(f"[bold green]report[/] {path}  ({summary['wall_seconds']:.0f}s)")
    return path


def build_report(cfg: DemoConfig, teacher: TeacherResult, ev, entropy, summary) -> Report:
    r = Report("distillarena demo")
    r.text("The built-in world: arithmetic problems of 1 to 4 operations with a chain of thought. Problems "
           "with independent sub-expressions have several valid step orders and the training data uses them "
           "at random, so the teacher is multi-modal where the order is chosen.")
    r.heading("Teacher")
    info = teacher.info
    r.table(["preset", "parameters", "training (s)", f"holdout {PROBE_DIFFICULTY}-op accuracy", "cached"],
            [[info["preset"], f"{info['parameters']:,}", info["train_seconds"], info["probe_accuracy"],
              "yes" if teacher.cached else "no"]])
    log = teacher.log
    losses = [x for x in log if "loss" in x]
    evals = [x for x in log if "holdout_accuracy" in x]
    if losses:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
        ax[0].plot([x["step"] for x in losses], [x["loss"] for x in losses])
        ax[0].set(xlabel="step", ylabel="loss (nats/token)", title="teacher training loss", yscale="log")
        ax[1].plot([x["train_seconds"] / 60 for x in evals], [x["holdout_accuracy"] for x in evals], "o-")
        ax[1].set(xlabel="training time (min)", ylabel="accuracy", ylim=(0, 1.02),
                  title=f"holdout accuracy, {PROBE_DIFFICULTY} operations")
        ax[1].grid(alpha=0.3)
        r.figure(fig)

    r.heading("Teacher accuracy by difficulty (test split, greedy)")
    diffs = sorted(ev.by_difficulty)
    r.table(["operations", "accuracy", "step validity", "n"],
            [[k, ev.by_difficulty[k]["accuracy"], ev.by_difficulty[k]["step_validity"],
              ev.by_difficulty[k]["n"]] for k in diffs])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar([str(k) for k in diffs], [ev.by_difficulty[k]["accuracy"] for k in diffs], color="#4477aa",
           label="final answer")
    ax.plot([str(k) for k in diffs], [ev.by_difficulty[k]["step_validity"] for k in diffs], "ko-",
            label="step validity")
    ax.set(xlabel="number of operations", ylabel="share", ylim=(0, 1.05), title="teacher on the test split")
    ax.legend(loc="lower left")
    r.figure(fig)

    r.heading("Teacher per-position entropy")
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for key, label in (("multi", "several valid step orders"), ("single", "one valid step order")):
        ax.plot(range(len(entropy[key])), entropy[key], label=label)
    ax.set(xlabel="completion position (tokens)", ylabel="entropy (nats)",
           title="teacher next-token entropy on 3-4 operation test problems (teacher-forced)")
    ax.legend()
    ax.grid(alpha=0.3)
    r.figure(fig, "Peaks where the next step's order is a free choice: the teacher keeps several modes.")

    r.heading("Sample completions")
    r.table(["prompt", "completion", "answer", "correct"],
            [[s["prompt"].strip(), s["completion"].replace("\n", " / "), s["answer"], s["correct"]]
             for s in ev.samples])
    r.heading("Run")
    r.code(f"teacher folder: {teacher.path}\nwall time: {summary['wall_seconds']:.0f}s")
    return r
