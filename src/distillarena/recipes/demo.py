"""``distillarena demo``: the whole story on the built-in world, in one run folder with one report.

1. The teacher (trained once, then cached): accuracy by difficulty, per-position entropy.
2. Distillation: HPD against SFT, SeqKD, one-hot reverse KL and one-hot JSD, each a ``distillarena distill`` run
   with the same teacher, student, data, steps and seeds.
3. The game: no defense, temperature and PoE against four attackers (passive, the paper's adaptive student, the
   competent value tilt, the verifier filter) and the worst case over them (a ``distillarena game`` run folder).
4. The four findings, computed from 2 and 3 (:mod:`.findings`), and ``report.html``.

An interrupted demo resumes when rerun on its folder (``--out`` the same folder, ``--overwrite``): finished
distillation runs (same config) and finished game cells are kept.

Run folder::

    config.yaml  metrics.jsonl  summary.json  report.html
    distill/<objective>-seed<k>/   one distill run folder each (student/, metrics.jsonl, summary.json)
    game/                          the game's run folder (its own report.html, results.csv, cells/)
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console

from distillarena.core.config import dump_config
from distillarena.core.errors import UserError
from distillarena.core.io import JsonlWriter, atomic_write_json, atomic_write_text, json_safe
from distillarena.evaluate.task_eval import evaluate_problems, per_position_entropy
from distillarena.models.presets import load_model, load_tokenizer
from distillarena.recipes.config import DemoConfig
from distillarena.report.findings import compute_findings, format_mean_std
from distillarena.report.html import Report
from distillarena.report.stats import bootstrap_mean, mean_std, outcomes, paired_difference
from distillarena.train.config import CheckpointConfig, DistillConfig, LoggingConfig, StudentConfig, TeacherSource
from distillarena.train.teacher import PROBE_DIFFICULTY, TeacherResult, model_path, teach

OBJECTIVE_LABELS = {"hpd": "HPD", "sft": "SFT", "seqkd": "SeqKD (one-hot forward KL)",
                    "rkl_onehot": "one-hot reverse KL", "jsd_onehot": "one-hot JSD"}
COLORS = {"hpd": "#cc3311", "sft": "#0077bb", "seqkd": "#33bbee", "rkl_onehot": "#009988", "jsd_onehot": "#ee7733"}


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
    phases: dict[str, float] = {}
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    metrics = JsonlWriter(out / "metrics.jsonl")

    def phase_done(name: str, since: float) -> float:
        phases[name] = time.perf_counter() - since
        return time.perf_counter()

    console.rule("[bold]1. Teacher")
    p0 = time.perf_counter()
    teacher = teach(cfg.teacher, console=console)
    for rec in teacher.log:
        metrics.write({"phase": "teacher_train", **rec})
    model = load_model(str(teacher.path))
    tok = load_tokenizer(str(teacher.path))
    p0 = phase_done("teacher", p0)

    console.rule("[bold]2. Teacher evaluation")
    task = cfg.teacher.task.build()
    test = task.problems("test", cfg.eval.n_per_difficulty * len(cfg.eval.difficulties),
                         cfg.eval.difficulties, seed=cfg.eval.seed)
    ev = evaluate_problems(model, tok, test, max_new_tokens=cfg.eval.max_new_tokens)
    for k, v in ev.by_difficulty.items():
        console.print(f"  {k} operation(s): accuracy {v['accuracy']:.1%}, step validity "
                      f"{v['step_validity']:.1%} (n={v['n']})")
        metrics.write({"phase": "teacher_eval", "difficulty": k, **v})
    # the entropy probe: 3-operation test problems (most have several valid solutions)
    probe = task.problems("test", 96, 3, seed=cfg.eval.seed)
    entropy = per_position_entropy(model, tok, probe)
    metrics.write({"phase": "teacher_entropy", **json_safe(entropy)})
    p0 = phase_done("teacher_eval", p0)

    distill_runs: list[dict[str, Any]] = []
    if cfg.distill is not None:
        console.rule("[bold]3. Distillation: HPD against the baselines")
        distill_runs = run_distillations(cfg, out / "distill", probe, console)
        for run in distill_runs:
            for rec in run["curve"]:
                metrics.write({"phase": "distill_eval", "objective": run["objective"], "seed": run["seed"], **rec})
        p0 = phase_done("distill", p0)

    game_rows = game_summary = None
    if cfg.game is not None:
        console.rule("[bold]4. The distillation game")
        from distillarena.game.sweep import run_game, table

        game_summary = run_game(cfg.game, out / "game", console=console)
        game_rows = table(cfg.game, out / "game")
        for r in game_rows:
            metrics.write({"phase": "game_cell", **json_safe({k: v for k, v in r.items() if k != "student_entropy"})})
        p0 = phase_done("game", p0)

    console.rule("[bold]5. Findings and report")
    findings = compute_findings(distill_runs, entropy.get("first_multi"), game_rows)
    for f in findings:
        console.print(f"  {f['number']}. [bold]{f['verdict']}[/]: {f['evidence']}", highlight=False)
    metrics.close()
    summary = {"teacher": str(teacher.path), "teacher_cached": teacher.cached, "teacher_eval": ev.as_dict(),
               "teacher_entropy": entropy,
               "distill": [{k: v for k, v in r.items() if k != "curve"} for r in distill_runs],
               "game": game_summary, "findings": findings, "phase_seconds": phases,
               "wall_seconds": time.perf_counter() - t0}
    atomic_write_json(out / "summary.json", json_safe(summary))
    report = build_report(cfg, teacher, ev, entropy, distill_runs, findings, summary)
    if cfg.game is not None:
        from distillarena.game.report import add_game_sections

        report.heading("The distillation game")
        report.text(f"Run folder {out / 'game'} (its own report.html and results.csv; rerun with "
                    f"`distillarena game {out / 'game' / 'config.yaml'} --out {out / 'game'}`).", note=True)
        add_game_sections(report, cfg.game, out / "game", game_rows, game_summary["rows"], game_summary)
    report.heading("Run")
    report.table(["phase", "seconds"], [[k, v] for k, v in phases.items()]
                 + [["total", time.perf_counter() - t0]])
    report.code(f"teacher folder: {teacher.path}")
    path = report.write(out / "report.html")
    console.print(f"[bold green]report[/] {path}  ({time.perf_counter() - t0:.0f}s)")
    return path


def distill_config(cfg: DemoConfig, objective: str, seed: int, student: StudentConfig) -> DistillConfig:
    d = cfg.distill
    return DistillConfig(teacher=TeacherSource(teach=cfg.teacher), student=student, data=d.data,
                         objective=objective, train=d.train.model_copy(update={"seed": seed}), eval=d.eval,
                         checkpoint=CheckpointConfig(every=0, keep=1), logging=LoggingConfig(tensorboard=False))


def run_distillations(cfg: DemoConfig, root: Path, probe, console: Console) -> list[dict[str, Any]]:
    """One distill run per (seed, objective); the final student's per-position entropy on ``probe``."""
    from distillarena.recipes.distill import run_distill

    student = cfg.distill.student
    if student is None:
        if cfg.game is None or cfg.game.student.teach is None and cfg.game.student.path is None:
            raise UserError("distill.student is null (the game's student) but the game is skipped: give a student")
        student = StudentConfig(path=str(model_path(cfg.game.student, console)))
    runs = []
    for seed in cfg.distill.seeds:
        for objective in cfg.distill.objectives:
            label = f"{objective}-seed{seed}"
            folder = root / label
            dcfg = distill_config(cfg, objective, seed, student)
            finished = (folder / "summary.json").is_file() and (folder / "config.yaml").is_file()
            if finished and (folder / "config.yaml").read_text() == dump_config(dcfg):
                # a rerun of an interrupted demo (same folder, --overwrite) keeps the runs that finished
                console.print(f"[green]reusing[/] {folder}")
                summary = json.loads((folder / "summary.json").read_text())
            else:
                console.print(f"[bold]distill[/] {OBJECTIVE_LABELS.get(objective, objective)} (seed {seed})")
                summary = run_distill(dcfg, folder, overwrite=True, console=console).summary
            curve = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            curve = [{k: v for k, v in r.items() if k != "phase"} for r in curve if r.get("phase") == "eval"]
            model = load_model(summary["student"])
            tok = load_tokenizer(summary["student"])
            ent = per_position_entropy(model, tok, probe)
            runs.append({"objective": objective, "seed": seed, "folder": str(folder), "curve": curve,
                         "final": summary["eval_final"], "entropy": ent, "first_step_entropy": ent["multi"][0],
                         "wall_seconds": summary["wall_seconds"]})
    return runs


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps = sorted({r["step"] for run in runs for r in run["curve"] if key in r})
    ys = []
    for s in steps:
        vals = [r[key] for run in runs for r in run["curve"] if r["step"] == s and r.get(key) is not None]
        ys.append(sum(vals) / len(vals) if vals else float("nan"))
    return steps, ys


def build_report(cfg: DemoConfig, teacher: TeacherResult, ev, entropy, distill_runs: list[dict[str, Any]],
                 findings: list[dict[str, Any]], summary: dict[str, Any]) -> Report:
    r = Report("distillarena demo")
    n_obj = len(cfg.distill.objectives) if cfg.distill is not None else 0
    r.text("The built-in world: arithmetic problems of 1 to 4 operations with a chain of thought. The training data "
           "writes the first step's operands in either order (\"14+16\" or \"16+14\") and, where sub-expressions "
           "are independent, computes them in either order, so the teacher is multi-modal where a solution is chosen. "
           "The demo trains that teacher"
           + (f", distills it into a student (the teacher with layers dropped) with HPD against {n_obj - 1} "
              "baseline(s)" if n_obj > 1 else "")
           + (", and plays the distillation game against its defenses." if cfg.game is not None else "."))
    r.parts.append("<p class='note'>Animated: <a href='explainer.html'>explainer.html</a>, what the objectives and "
                   "defenses do, frame by frame (written into this folder by <code>distillarena explain --from "
                   "RUN_DIR</code>, about a minute).</p>")
    r.heading("Findings")
    r.table(["#", "question", "verdict", "effect [95% interval] (n)", "seeds", "evidence"],
            [[f["number"], f["question"], f["verdict"],
              (f"{f['effect']:+.3f} [{f['ci_low']:+.3f}, {f['ci_high']:+.3f}] (n={f['n']}): {f['effect_name']}"
               if f["effect"] is not None else "–"),
              ", ".join(map(str, f["seeds"])) or "–", f["evidence"]]
             for f in findings])
    r.text("Computed from this run's numbers by distillarena.report.findings. A verdict is yes or no only when the "
           "paired bootstrap 95% interval of its effect (over the shared test problems and the seeds) lies on one "
           "side of zero; otherwise it is inconclusive. examples/findings.yaml runs three seeds.", note=True)

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
    for key, label in (("multi", "several valid solutions"), ("single", "one valid solution")):
        ax.plot(range(len(entropy[key])), entropy[key], label=label)
    ax.set(xlabel="completion position (tokens)", ylabel="entropy (nats)",
           title="teacher next-token entropy on 3-operation test problems (teacher-forced)")
    ax.legend()
    ax.grid(alpha=0.3)
    r.figure(fig, "Peaks where the next step's order is a free choice: the teacher keeps several modes.")

    r.heading("Sample completions")
    r.table(["prompt", "completion", "answer", "correct"],
            [[s["prompt"].strip(), s["completion"].replace("\n", " / "), s["answer"], s["correct"]]
             for s in ev.samples])
    if distill_runs:
        distill_sections(r, cfg, distill_runs, entropy)
    return r


def _outcome_matrix(runs: list[dict[str, Any]], step: int | None) -> np.ndarray | None:
    """Per-problem outcomes of ``runs`` (one row per seed) at eval ``step`` (None: the final eval)."""
    rows = []
    for run in sorted(runs, key=lambda r: r["seed"]):
        rec = run["final"] if step is None else next((c for c in run["curve"] if c["step"] == step), {})
        if not rec.get("correct"):
            return None
        rows.append(outcomes(rec["correct"]))
    return np.stack(rows) if rows else None


def _accuracy_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Held-out accuracy at each eval step: the mean over seeds and its 95% bootstrap interval (problems and seeds)."""
    steps = sorted({c["step"] for run in runs for c in run["curve"] if "accuracy" in c})
    xs, ys, lo, hi = [], [], [], []
    for s in steps:
        m = _outcome_matrix(runs, s)
        if m is None:
            continue
        iv = bootstrap_mean(m, replicates=500)
        xs.append(s)
        ys.append(iv.mean)
        lo.append(iv.ci_low)
        hi.append(iv.ci_high)
    return xs, ys, lo, hi


def _at_start(runs: list[dict[str, Any]], key: str) -> list[Any]:
    return [next((c.get(key) for c in run["curve"] if c["step"] == 0), None) for run in runs]


def distill_sections(r: Report, cfg: DemoConfig, runs: list[dict[str, Any]], teacher_entropy) -> None:
    d = cfg.distill
    objectives = list(dict.fromkeys(run["objective"] for run in runs))
    by = {o: [run for run in runs if run["objective"] == o] for o in objectives}
    featured = objectives[0]  # the method under study is listed first (hpd by default) and drawn bold
    epochs = d.train.steps * d.train.batch_size / max(d.data.train_size, 1)
    r.heading("Distillation: HPD against the baselines")
    student = ("the game's student before any trace" if d.student is None else
               f"the teacher keeping one layer in {d.student.from_teacher.keep_every}" if d.student.from_teacher
               else d.student.init)
    r.text(f"Same teacher, same student ({student}), the same fixed set of {d.data.train_size} training prefixes of "
           f"{d.data.task.n_ops}-operation problems seen about {epochs:.0f} times ({d.train.steps} steps of batch "
           f"{d.train.batch_size} at lr {d.train.lr}: many epochs on little data, where the HPD paper saw SFT "
           f"collapse), seeds {d.seeds}. Held-out: {d.eval.n_problems} problems (greedy accuracy, shaded: 95% "
           f"bootstrap interval over problems and seeds) and {d.eval.n_examples} teacher-forced sequences (exact "
           "forward and reverse KL over the full vocabulary, means over seeds).")
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for o in objectives:
        color, lw = COLORS.get(o), (2.5 if o == featured else 1.5)
        xs, ys, lo, hi = _accuracy_curve(by[o])
        ax[0].plot(xs, ys, "o-", color=color, label=OBJECTIVE_LABELS.get(o, o), lw=lw)
        ax[0].fill_between(xs, lo, hi, color=color, alpha=0.12)
        for a, key in zip(ax[1:], ("heldout_fkl", "heldout_rkl", "choice_entropy"), strict=True):
            xs, ys = _mean_curve(by[o], key)
            a.plot(xs, ys, "o-", color=color, label=OBJECTIVE_LABELS.get(o, o), lw=lw)
    t_choice = [c["teacher_choice_entropy"] for run in runs for c in run["curve"] if c.get("teacher_choice_entropy")]
    if t_choice:
        ax[3].axhline(sum(t_choice) / len(t_choice), color="k", lw=2, label="teacher")
    for a, title in zip(ax, ("held-out accuracy (greedy)", "held-out forward KL(teacher || student)",
                             "held-out reverse KL(student || teacher)", "entropy where the first step is chosen"),
                        strict=True):
        a.set(xlabel="step", title=title)
        a.grid(alpha=0.3)
    ax[1].set_yscale("log")
    ax[2].set_yscale("log")
    ax[3].set_ylabel("nats")
    ax[0].legend(fontsize=8)
    ax[3].legend(fontsize=7)
    r.figure(fig, "A student that keeps the teacher's modes keeps its entropy at the choice near the teacher's "
                  "(black); one that collapses onto one mode drives it towards zero.")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(teacher_entropy["multi"], color="k", lw=2.5, label="teacher")
    for o in objectives:
        curves = [run["entropy"]["multi"] for run in by[o]]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
        ax.plot(mean, color=COLORS.get(o), label=OBJECTIVE_LABELS.get(o, o), lw=2 if o == featured else 1.2)
    ax.set(xlabel="completion position (tokens)", ylabel="entropy (nats)",
           title="next-token entropy after training, 3-operation problems with several solutions (teacher-forced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    r.figure(fig, "Entropy peaks mark the choices (step order, operand order); a collapsed student flattens them.")

    def ms(vals: list[Any]) -> str:
        return format_mean_std(*mean_std(vals), digits=3)

    start_runs = by[objectives[0]]
    start = _outcome_matrix(start_runs, 0)
    rows = []
    if start is not None:
        iv = bootstrap_mean(start)
        rows.append(["start (before distillation)", f"{iv.mean:.3f} [{iv.ci_low:.3f}, {iv.ci_high:.3f}]", "–",
                     ms(_at_start(start_runs, "heldout_fkl")), ms(_at_start(start_runs, "heldout_rkl")),
                     ms(_at_start(start_runs, "choice_entropy")), "–"])
    below = []
    for o in objectives:
        final = _outcome_matrix(by[o], None)
        acc = bootstrap_mean(final) if final is not None else None
        gain = (paired_difference(final, start) if final is not None and start is not None
                and final.shape == start.shape else None)
        if gain is not None and gain.mean < 0:
            below.append(f"{OBJECTIVE_LABELS.get(o, o)} ends below the start by {-gain.mean:.3f} "
                         f"(interval {gain.ci_low:+.3f} to {gain.ci_high:+.3f})")
        rows.append([OBJECTIVE_LABELS.get(o, o),
                     f"{acc.mean:.3f} [{acc.ci_low:.3f}, {acc.ci_high:.3f}]" if acc else "–",
                     gain.format(3) if gain else "–",
                     ms([x["final"].get("heldout_fkl") for x in by[o]]),
                     ms([x["final"].get("heldout_rkl") for x in by[o]]),
                     ms([x["final"].get("choice_entropy") for x in by[o]]), ms([x["wall_seconds"] for x in by[o]])])
    rows.append(["teacher", "–", "–", "–", "–", ms(_at_start(runs[:1], "teacher_choice_entropy")), "–"])
    r.table(["objective", "accuracy [95% CI]", "change from start [95% CI] (n)", "forward KL", "reverse KL",
             "entropy at the choice", "train + eval (s)"], rows)
    if start is None:
        r.text("The starting accuracy was not recorded.", note=True)
    elif below:
        r.text("; ".join(below) + ".")
    else:
        r.text("Every objective ends above the student's starting accuracy.", note=True)
