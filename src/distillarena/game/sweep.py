"""``distillarena game``: defenses x strengths x attackers x seeds from one config, one cached cell each.

Run folder::

    config.yaml       the resolved config of the latest run
    game.json         the task and teacher every cell was computed with (a rerun with another is refused)
    teacher.json      the undefended teacher's per-position entropy (computed once)
    base/<key>.json   the student before any trace (accuracy, entropy): computed once, shared by every cell
    traces/<key>/     one trace collection per (defense, strength, seed): traces.jsonl + meta.json
    cells/<key>/      one finished cell: cell.json (+ values.json: per-trace value and weight)
    results.jsonl     one row per cell of this config, with recovery; results.csv the same as CSV
    summary.json      means and stds over seeds, the passive/adaptive gaps
    report.html       the report (self-contained)

Every folder is written in one rename when finished, so an interrupted sweep loses only the cell it was in, and
a rerun skips every finished cell. A cell's key is the hash of everything that determines it (task, teacher,
defense and strength, attacker, seed, budget, prompts, reveal, student, training and evaluation settings); the
undefended reference cell of an attacker and seed (``none`` at temperature 1) is an ordinary cell, shared with a
sweep that lists ``none`` itself. ``results.*``, ``summary.json`` and the report are rebuilt from the cell folders
alone (:func:`rebuild`).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distillarena.attacks.lm import EncodedPair
from distillarena.core.config import dump_config
from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json, atomic_write_text, json_safe
from distillarena.evaluate.task_eval import evaluate_problems, per_position_entropy
from distillarena.game.attack import apply_plan, attack_context, plan_attack, train_student
from distillarena.game.collect import collect, game_task, load_traces
from distillarena.game.config import AttackerConfig, DefenseConfig, GameConfig
from distillarena.game.detect import detectability, detectability_rows
from distillarena.game.keys import UNDEFENDED, base_key, cell_key, digest, traces_key, world_of
from distillarena.game.metrics import (
    RECOVERY_FLOOR,
    aggregate,
    gap_intervals,
    gaps,
    intervals,
    recovery,
    worst_case,
)
from distillarena.game.utility import utility_table
from distillarena.report.stats import finite, outcomes, paired_ratio
from distillarena.tasks.data import Example, encode_example, problem_example
from distillarena.train.teacher import resolve_model


@dataclass
class Cell:
    defense: DefenseConfig
    attacker: AttackerConfig
    seed: int

    @property
    def label(self) -> str:
        return f"{self.defense.label} | {self.attacker.label} | seed {self.seed}"


def plan_cells(cfg: GameConfig) -> list[Cell]:
    """The sweep's cells, each undefended reference first (computed once per attacker and seed)."""
    cells: list[Cell] = []
    seen: set[str] = set()

    def add(c: Cell) -> None:
        k = cell_key(cfg, c.defense, c.attacker, c.seed)
        if k not in seen:
            seen.add(k)
            cells.append(c)

    for a in cfg.attackers:
        for s in cfg.seeds:
            add(Cell(UNDEFENDED, a, s))
    for d in cfg.defenses:
        for params in d.strengths:
            for a in cfg.attackers:
                for s in cfg.seeds:
                    add(Cell(d.at(params), a, s))
    return cells


class Game:
    """The state a sweep shares between cells: models loaded once, cached pieces read from the run folder."""

    def __init__(self, cfg: GameConfig, out: Path, console: Console):
        self.cfg, self.out, self.console = cfg, Path(out), console
        self.task = game_task(cfg)
        self._student = None
        self._teacher = None
        self._models: dict[str, Any] = {}
        self.test = self.task.problems("test", cfg.eval.n_problems, cfg.eval.difficulties, seed=0)
        # 3-operation problems: the smallest with several valid step orders (where a multi-modal teacher shows)
        self.entropy_problems = (self.task.problems("test", cfg.eval.entropy_problems, [3], seed=1)
                                 if cfg.eval.entropy_problems else [])

    # --- models -------------------------------------------------------------------------------------------------
    def student(self):
        if self._student is None:
            model, tok, path = resolve_model(self.cfg.student, self.console)
            self._student = (model.to(torch.float32), tok, str(path))
        return self._student

    def teacher(self):
        if self._teacher is None:
            model, tok, path = resolve_model(self.cfg.teacher, self.console)
            self._teacher = (model, tok, str(path))
        return self._teacher

    def holdout(self, tok, source: str = "reference") -> list[EncodedPair]:
        """The attacker's clean holdout on ``cfg.holdout`` holdout-split problems: reference solutions, or
        (``teacher``) the undefended teacher's completions of them at the game's decoding (sampled once, cached in
        ``holdout/``)."""
        problems = self.task.problems("holdout", self.cfg.holdout, self.cfg.prompts.n_ops, seed=0)
        if source == "reference":
            return [encode_example(tok, problem_example(p)) for p in problems]
        what = {"world": world_of(self.cfg), "decoding": self.cfg.decoding.params(), "n": len(problems),
                "n_ops": self.cfg.prompts.n_ops, "max_new_tokens": self.cfg.max_new_tokens}
        path = self.out / "holdout" / f"teacher-{digest(what)}.json"
        if path.is_file():
            completions = json.loads(path.read_text())["completions"]
        else:
            from distillarena.game.traces import _teacher_completions

            teacher, ttok, _ = self.teacher()
            completions = _teacher_completions(teacher, ttok, [p.prompt for p in problems], self.cfg.decoding.params(),
                                               max_new_tokens=self.cfg.max_new_tokens)
            atomic_write_json(path, {"source": "undefended teacher", "decoding": self.cfg.decoding.params(),
                                     "completions": completions})
        return [encode_example(tok, Example(prompt=p.prompt, completion=c))
                for p, c in zip(problems, completions, strict=True)]

    def load_model(self, ref):
        """``(model, tokenizer)`` of a model reference (a defense's proxy for an attacker that knows it), cached."""
        key = json.dumps(ref.model_dump(mode="json"), sort_keys=True)
        if key not in self._models:
            model, tok, _ = resolve_model(ref, self.console)
            self._models[key] = (model, tok)
        return self._models[key]

    def attack_traces(self, c: Cell) -> tuple[Path, dict[str, Any]]:
        """The traces the cell's attacker bought; with k samples per prompt, the teacher's utility still comes from
        the one-sample collection of the same defense and seed (a property of the defense, the same for every
        attacker), and the k-sample collection's own numbers are kept as ``sampled_*``."""
        k = c.attacker.samples_per_prompt
        folder = self.out / "traces" / traces_key(self.cfg, c.defense, c.seed, k)
        meta = collect(self.cfg, c.defense, c.seed, folder, self.console, samples_per_prompt=k)
        if k == 1:
            return folder, meta
        own = {f"sampled_{n}": meta.get(n) for n in ("traces", "teacher_accuracy", "teacher_tokens")}
        return folder, {**self.traces(c.defense, c.seed)[1], **own, "samples_per_prompt": k}

    def skipped_cell(self, c: Cell, key: str, folder: Path, tkey: str, meta: dict[str, Any], plan) -> dict[str, Any]:
        cell = {"key": key, "world": digest(world_of(self.cfg)), "defense": c.defense.kind,
                "params": dict(c.defense.params), "defense_label": c.defense.label, "attacker": c.attacker.label,
                "attacker_kind": c.attacker.kind, "attacker_config": c.attacker.model_dump(mode="json"),
                "seed": c.seed, "budget": self.cfg.budget, "traces_key": tkey, "base_key": base_key(self.cfg),
                "skipped": plan.skipped, "student_accuracy": None, "student_correct": None, "n_trained": 0,
                **{k: v for k, v in meta.items() if k not in ("defense", "params", "seed")}, **plan.info}
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / "cell.json", cell)
        return cell

    # --- cached pieces -------------------------------------------------------------------------------------------
    def teacher_info(self) -> dict[str, Any]:
        path = self.out / "teacher.json"
        if path.is_file():
            return json.loads(path.read_text())
        model, tok, where = self.teacher()
        ev = evaluate_problems(model, tok, self.test, max_new_tokens=self.cfg.eval.max_new_tokens, task=self.task)
        info = {"teacher": where, "greedy_accuracy": ev.accuracy, "greedy_step_validity": ev.step_validity,
                "entropy": per_position_entropy(model, tok, self.entropy_problems) if self.entropy_problems
                else None, **self.multimodality(model, tok)}
        atomic_write_json(path, info)
        return info

    def multimodality(self, model, tok) -> dict[str, Any]:
        """How many of the attacked prompts admit several valid solutions, and the teacher's entropy where the first
        step is chosen (mean over 128 test problems of the attacked difficulties that have a choice)."""
        prompts = self.task.problems("train", self.cfg.budget, self.cfg.prompts.n_ops, seed=self.cfg.prompts.seed)
        probe = self.task.problems("test", 128, self.cfg.prompts.n_ops, seed=2)
        first = per_position_entropy(model, tok, probe).get("first_multi") or []
        return {"multimodal_share": sum(p.n_solutions > 1 for p in prompts) / max(len(prompts), 1),
                "choice_entropy": sum(first) / len(first) if first else None, "choice_entropy_n": len(first)}

    def base(self) -> dict[str, Any]:
        path = self.out / "base" / f"{base_key(self.cfg)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        model, tok, where = self.student()
        ev = evaluate_problems(model, tok, self.test, max_new_tokens=self.cfg.eval.max_new_tokens, task=self.task)
        info = {"student": where, "accuracy": ev.accuracy, "step_validity": ev.step_validity,
                "by_difficulty": {str(k): v for k, v in ev.by_difficulty.items()}, "correct": ev.outcomes,
                "entropy": per_position_entropy(model, tok, self.entropy_problems) if self.entropy_problems
                else None}
        atomic_write_json(path, info)
        return info

    def traces(self, d: DefenseConfig, seed: int) -> tuple[Path, dict[str, Any]]:
        folder = self.out / "traces" / traces_key(self.cfg, d, seed)
        return folder, collect(self.cfg, d, seed, folder, self.console)

    # --- one cell ------------------------------------------------------------------------------------------------
    def run_cell(self, c: Cell) -> dict[str, Any]:
        key = cell_key(self.cfg, c.defense, c.attacker, c.seed)
        folder = self.out / "cells" / key
        if (folder / "cell.json").is_file():
            return json.loads((folder / "cell.json").read_text())
        t0 = time.perf_counter()
        tfolder, meta = self.attack_traces(c)
        records = load_traces(tfolder)
        base_model, tok, _ = self.student()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        a = c.attacker
        student = copy.deepcopy(base_model)
        ctx = attack_context(a, records, student, tok, task=self.task, defense=c.defense, cfg=self.cfg, seed=c.seed,
                             holdout=lambda source: self.holdout(tok, source), load_model=self.load_model)
        plan = plan_attack(a, ctx, referee=self.teacher)
        if plan.skipped:  # e.g. no log-probs revealed: recorded, with the reason, and no student trained
            return self.skipped_cell(c, key, folder, tfolder.name, meta, plan)
        enc, topk = apply_plan(ctx, plan, tok)
        t1 = time.perf_counter()
        student = train_student(student, enc, plan, topk, a, self.cfg, seed=c.seed, pad_id=pad)
        train_s = time.perf_counter() - t1
        ev = evaluate_problems(student, tok, self.test, max_new_tokens=self.cfg.eval.max_new_tokens,
                               task=self.task)
        entropy = (per_position_entropy(student, tok, self.entropy_problems) if self.entropy_problems else None)
        cell = {
            "key": key, "world": digest(world_of(self.cfg)), "defense": c.defense.kind,
            "params": dict(c.defense.params), "defense_label": c.defense.label,
            "attacker": a.label, "attacker_kind": a.kind, "attacker_config": a.model_dump(mode="json"),
            "seed": c.seed, "budget": self.cfg.budget, "traces_key": tfolder.name, "base_key": base_key(self.cfg),
            "student_accuracy": ev.accuracy, "student_step_validity": ev.step_validity,
            "student_correct": ev.outcomes,
            "student_by_difficulty": {str(k): v for k, v in ev.by_difficulty.items()},
            "student_entropy": entropy, "train_s": train_s, "cell_s": time.perf_counter() - t0,
            "n_trained": len(plan.keep), **{k: v for k, v in meta.items() if k not in ("defense", "params", "seed")},
            **plan.info, **detectability(self.cfg, student, tok, self.task, records, self.teacher),
        }
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / "cell.json", cell)
            if plan.values is not None:
                atomic_write_json(tmp / "values.json", {"values": plan.values, "keep": plan.keep,
                                                        "weights": plan.weights})
        return cell


def check_world(cfg: GameConfig, out: Path) -> None:
    path = Path(out) / "game.json"
    world = world_of(cfg)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != world:
            diff = [k for k in world if old.get(k) != world[k]]
            raise UserError(f"run folder {out} holds cells computed with another {' and '.join(diff)}: the cells of "
                            "one sweep must agree on the task and the teacher; use another --out")
    else:
        atomic_write_json(path, world)


def run_game(cfg: GameConfig, out: Path, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg`` in ``out``; returns the summary."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_world(cfg, out)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    game = Game(cfg, out, console)
    cells = plan_cells(cfg)
    done = sum((out / "cells" / cell_key(cfg, c.defense, c.attacker, c.seed) / "cell.json").is_file() for c in cells)
    console.print(f"[bold]game[/] {len(cells)} cells ({done} already finished) in {out}")
    game.teacher_info()
    game.base()
    t0 = time.perf_counter()
    for i, c in enumerate(cells, 1):
        key = cell_key(cfg, c.defense, c.attacker, c.seed)
        if (out / "cells" / key / "cell.json").is_file():
            continue
        c0 = time.perf_counter()
        rec = game.run_cell(c)
        if rec.get("skipped"):
            console.print(f"[{i}/{len(cells)}] {c.label}: [yellow]{rec['skipped']}[/]")
            continue
        msg = f"[{i}/{len(cells)}] {c.label}: student accuracy {rec['student_accuracy']:.1%}"
        if rec.get("oracle_spearman") is not None:
            msg += f", value/oracle rank corr {rec['oracle_spearman']:+.2f}"
        console.print(msg + f" ({time.perf_counter() - c0:.0f}s)")
    console.print(f"cells done in {time.perf_counter() - t0:.0f}s")
    return rebuild(out, cfg, console=console)


# --------------------------------------------------------------------------------------------------------------
# The table, from the run folder alone
# --------------------------------------------------------------------------------------------------------------


def table(cfg: GameConfig, out: Path) -> list[dict[str, Any]]:
    """One row per finished cell of ``cfg`` (the undefended references included), with base accuracy, the
    reference accuracy and the recovery R."""
    out = Path(out)
    base = json.loads((out / "base" / f"{base_key(cfg)}.json").read_text())
    world = digest(world_of(cfg))
    rows, refs = [], {}
    for c in plan_cells(cfg):
        p = out / "cells" / cell_key(cfg, c.defense, c.attacker, c.seed) / "cell.json"
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        if r["world"] != world:
            raise UserError(f"cell {p.parent.name} was computed with another task or teacher than this config")
        r["attacker"] = c.attacker.label  # the name may have changed since (it is not part of the key)
        r["undefended_reference"] = c.defense.kind == "none" and not c.defense.params
        if r["undefended_reference"] and r.get("student_accuracy") is not None:
            refs[(r["attacker"], r["seed"])] = r["student_accuracy"]
        rows.append(r)
    base_out = outcomes(base.get("correct"))
    ref_out = {(r["attacker"], r["seed"]): outcomes(r.get("student_correct")) for r in rows
               if r["undefended_reference"]}
    for r in rows:
        r["base_accuracy"] = base["accuracy"]
        ref = refs.get((r["attacker"], r["seed"]))
        r["reference_accuracy"] = ref
        if r.get("skipped"):
            r["recovery"], r["recovery_note"] = float("nan"), r["skipped"]
        elif ref is None:
            r["recovery"], r["recovery_note"] = float("nan"), "the undefended reference cell is missing"
        else:
            r["recovery"], r["recovery_note"] = recovery(r["student_accuracy"], base["accuracy"], ref)
        x, ref_x = outcomes(r.get("student_correct")), ref_out.get((r["attacker"], r["seed"]))
        if base_out is not None and x is not None and ref_x is not None and x.size == ref_x.size == base_out.size:
            ratio = paired_ratio(x - base_out, ref_x - base_out, floor=RECOVERY_FLOOR)  # this cell's seed alone
            r["recovery_ci"] = ratio.as_dict()
            if ratio.unstable and finite(r["recovery"]):
                r["recovery"], r["recovery_note"] = float("nan"), (
                    f"unstable: the undefended gain {ratio.denominator.format(3)} reaches below "
                    f"{RECOVERY_FLOOR} (one seed)")
    return rows


CSV_COLUMNS = ["defense_label", "defense", "attacker", "attacker_kind", "seed", "budget", "teacher_accuracy",
               "teacher_accuracy_forced", "teacher_step_validity", "teacher_checkable", "poisoned_fraction",
               "teacher_kl", "teacher_tokens_per_s",
               "proxy_forwards_per_token", "offline_s", "base_accuracy", "reference_accuracy", "student_accuracy",
               "student_step_validity", "recovery", "recovery_note", "oracle_spearman", "ess_fraction",
               "frac_mass_top20", "n_trained", "train_s", "valuation_s", "key"]


def rebuild(out: Path, cfg: GameConfig, console: Console | None = None, report: bool = True) -> dict[str, Any]:
    """Write ``results.jsonl``, ``results.csv``, ``summary.json`` (and ``report.html``) from the run folder."""
    out = Path(out)
    rows = table(cfg, out)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(out / "results.csv", buf.getvalue())
    base = json.loads((out / "base" / f"{base_key(cfg)}.json").read_text())
    summ = aggregate(rows)
    ivs = intervals(rows, base.get("correct"))
    undefended_gain: dict[str, Any] = {}
    for s in summ:
        iv = ivs.get((s["defense_label"], s["attacker"]), {})
        s["gain"] = iv["gain"].as_dict() if "gain" in iv else None
        s["undefended_gain"] = iv["undefended_gain"].as_dict() if "undefended_gain" in iv else None
        if "recovery" in iv:  # R as a ratio of means over the seeds' shared denominator, not a mean of ratios
            s["recovery_ci"] = iv["recovery"].as_dict()
            s["recovery"] = iv["recovery"].as_dict()["mean"]
            s["recovery_unstable"] = iv["recovery"].unstable
        if s["undefended_gain"] is not None:
            undefended_gain[s["attacker"]] = s["undefended_gain"]
    gap_rows = gaps(summ)
    gap_ivs = gap_intervals(rows)
    for g in gap_rows:
        iv = gap_ivs.get((g["defense_label"], g["attacker"]))
        g["accuracy_gap_ci"] = iv.as_dict() if iv is not None else None
    worst = worst_case(rows, summ, base.get("correct"))  # the defender's honest frontier: the best attacker
    summary = {"cells": len(rows), "rows": json_safe(summ), "gaps": json_safe(gap_rows), "worst_case": json_safe(worst),
               "undefended_gain": json_safe(undefended_gain), "decoding": cfg.decoding.params(), "base": base,
               "utility": json_safe(utility_table(rows, summ))}
    teacher_json = out / "teacher.json"
    if teacher_json.is_file():
        t = json.loads(teacher_json.read_text())
        summary["multimodality"] = {k: t.get(k) for k in ("multimodal_share", "choice_entropy", "choice_entropy_n")}
    summary["detectability"] = json_safe(detectability_rows(cfg, rows))
    atomic_write_json(out / "summary.json", summary)
    if report:
        from distillarena.game.report import write_report

        path = write_report(cfg, out, rows, summ, summary)
        if console is not None:
            console.print(f"[bold green]report[/] {path}")
    return summary
