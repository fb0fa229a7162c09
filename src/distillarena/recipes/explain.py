"""``distillarena explain``: an animated explainer of distillation and its defenses, every frame computed.

1. Mode covering vs mode seeking: a one-humped student fitted to a two-humped teacher by forward KL, reverse KL,
   JSD and HPD (:func:`distillarena.report.explain.fit_modes`, through ``compute_objective``).
2. Inside the built-in task: the teacher's next token at a step-order choice, and students trained from it with
   SFT and HPD (the distillation loop, ``DistillLoss``), watched at that choice every few steps.
3. What a defense does at that position: temperature, top-p truncation, PoE (γ from 0 to 1) and antidistillation
   sampling (λ from 0) built by ``build_policy`` and applied to the teacher's real logits, with tokens drawn from
   each; then, with ``--from`` a demo or game run folder, its frontier traced cell by cell.

Models: the run's teacher and proxy with ``--from``; otherwise the cached built-in teacher, or, when none is
cached, the tiny preset trained quickly (:data:`FALLBACK_TEACHER`), and the defenses' default proxy. Output
(``--out``, default the ``--from`` folder, so that the demo's report links to it; otherwise ``runs/explain-<time>``)::

    explainer.html      self-contained: the animations embedded as GIF data, plain captions beside them
    explainer/          the same animations as GIF files: modes.gif task.gif defenses.gif [frontier.gif]
"""

from __future__ import annotations

import copy
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from rich.console import Console

from distillarena.core.config import Strict, load_config
from distillarena.core.errors import UserError
from distillarena.core.io import atomic_write_json, json_safe
from distillarena.decoding import apply_processors, sample_from_probs, sampling_warpers
from distillarena.defenses.policy import build_policy
from distillarena.defenses.spec import DEFENSES
from distillarena.game.config import DefenseConfig, GameConfig, default_proxy
from distillarena.game.traces import defense_gradient
from distillarena.objectives import get_objective
from distillarena.report.explain import (
    DefenseSweep,
    ExplainerPage,
    FrontierPoint,
    TaskFrames,
    TokenView,
    defense_animation,
    defense_caption,
    fit_modes,
    frontier_animation,
    frontier_caption,
    modes_animation,
    modes_caption,
    save_gif,
    task_animation,
    task_caption,
)
from distillarena.report.stats import finite
from distillarena.tasks.config import TaskConfig
from distillarena.tasks.data import Example, arithmetic_examples, encode_example
from distillarena.teachers.local import LocalTeacher
from distillarena.train.config import ModelRef, TeacherConfig, TrainConfig
from distillarena.train.distill import DistillLoss, DistillStream, Encoded, Stage
from distillarena.train.loop import LoopConfig, full_precision_accelerator, train
from distillarena.train.teacher import model_path, resolve_model

# No cached built-in teacher: the tiny preset, trained in about 20 s on two idle cores; another seed and more steps than
# the default proxy (the tiny preset, 300 steps, seed 0), so that PoE mixes in a model that differs from the teacher.
FALLBACK_TEACHER = TeacherConfig(preset="tiny", train=TrainConfig(steps=400, lr=3e-3, seed=1, eval_every=0))
GIF_DIR = "explainer"


def _registered(names: list[str]) -> list[str]:
    for name in names:
        try:
            get_objective(name)
        except UserError as e:
            raise ValueError(str(e)) from None
    return names


class ExplainModes(Strict):
    objectives: list[str] = Field(default_factory=lambda: ["fkl", "rkl", "jsd", "hpd"], min_length=1)
    _known = field_validator("objectives")(_registered)
    steps: int = Field(300, ge=1)
    record_every: int = Field(5, ge=1, description="one frame every N steps")
    lr: float = Field(0.05, gt=0)


class ExplainStudents(Strict):
    objectives: list[str] = Field(default_factory=lambda: ["sft", "hpd"], min_length=1)
    _known = field_validator("objectives")(_registered)
    start: ModelRef | None = Field(None, description="the students' starting model (default: the proxy)")
    steps: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    frames: int = Field(15, ge=1, description="students are watched this many times during training")
    train_size: int = Field(1024, ge=1)
    probes: int = Field(48, ge=1, description="problems with two valid first steps, for the mean entropy")


class ExplainDefenses(Strict):
    frames: int = Field(24, ge=2)
    draws: int = Field(200, ge=1, description="tokens sampled per frame (the same random numbers every frame)")
    temperature: tuple[float, float] = (0.5, 2.5)
    top_p: tuple[float, float] = (1.0, 0.2)
    gamma: tuple[float, float] = (0.0, 1.0)
    lam: tuple[float, float] = (0.0, 0.4)
    holdout_traces: int = Field(256, ge=1, description="holdout problems for the antidistillation gradient")


class ExplainConfig(Strict):
    """``distillarena explain``: every field has a default that runs in about a minute on the built-in world."""

    teacher: ModelRef | None = Field(None, description="default: the --from run's teacher, else the cached "
                                                       "built-in teacher, else the tiny preset trained quickly")
    proxy: ModelRef | None = Field(None, description="PoE's and antidistillation's proxy (default: the --from "
                                                     "run's, else the game's default proxy)")
    modes: ExplainModes = Field(default_factory=ExplainModes)
    students: ExplainStudents = Field(default_factory=ExplainStudents)
    defenses: ExplainDefenses = Field(default_factory=ExplainDefenses)
    fps: int = Field(8, ge=1)
    dpi: int = Field(80, ge=20)


def new_explain_dir(root: Path, out: Path | None, source: Path | None) -> Path:
    if out is None:
        out = source if source is not None else Path(root) / f"explain-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The --from run folder
# ---------------------------------------------------------------------------------------------------------------


def find_game(source: Path) -> Path:
    """The game run folder in ``source``: ``source`` itself (a ``distillarena game`` folder) or ``source/game`` (a
    demo's); a UserError if there is none or it has no results yet."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"--from {source}: no such run folder")
    for d in (source, source / "game"):
        if (d / "game.json").is_file():
            if not (d / "summary.json").is_file() or not (d / "config.yaml").is_file():
                raise UserError(f"the game in {d} has no results yet (no summary.json or config.yaml): let it "
                                f"finish, or rebuild them with `distillarena game --report-only --out {d}`")
            return d
    raise UserError(f"--from {source}: not a run folder with a game (no game.json in it or in {source / 'game'}); "
                    "give a `distillarena demo` or `distillarena game` run folder, or leave out --from")


def frontier_points(game_dir: Path) -> list[FrontierPoint]:
    """The game's cells (mean over seeds) in the order they are revealed: per attacker, the undefended teacher,
    then each defense's strengths from the most useful teacher down. Cells with an undefined recovery are left out."""
    rows = json.loads((game_dir / "summary.json").read_text()).get("rows", [])
    pts = [FrontierPoint(r["defense_label"], r["defense"], r["attacker"], float(r["recovery"]),
                         float(r["teacher_accuracy"]))
           for r in rows if finite(r.get("recovery")) and finite(r.get("teacher_accuracy"))]
    attackers = list(dict.fromkeys(p.attacker for p in pts))
    kinds = list(dict.fromkeys(p.kind for p in pts if p.defense != "none"))

    def order(p: FrontierPoint) -> tuple:
        ref = p.defense == "none"
        return (attackers.index(p.attacker), -1 if ref else kinds.index(p.kind), -p.utility)

    return sorted(pts, key=order)


def _run_models(cfg: ExplainConfig, game: GameConfig | None, game_dir: Path | None,
                console: Console) -> tuple[ModelRef, ModelRef, TaskConfig]:
    """The teacher and proxy to explain with, and the teacher's task: the config's, else the ``--from`` game's (its
    teacher by the folder it recorded, so a later change of the defaults cannot swap it), else the cached built-in
    teacher, else :data:`FALLBACK_TEACHER`."""
    teacher = cfg.teacher
    if teacher is None and game is not None:
        teacher = game.teacher
        info = game_dir / "teacher.json"
        recorded = json.loads(info.read_text()).get("teacher") if info.is_file() else None
        if recorded and Path(recorded).is_dir():
            teacher = ModelRef(path=recorded)
        task = (game.teacher.teach or TeacherConfig()).task
    if teacher is None:
        teacher = ModelRef()
        if model_path(teacher, train=False) is None:
            console.print("[yellow]no cached built-in teacher[/]: training the tiny preset instead "
                          f"({FALLBACK_TEACHER.train.steps} steps; `distillarena teach` trains the real one)")
            teacher = ModelRef(teach=FALLBACK_TEACHER)
    if game is None or cfg.teacher is not None:
        task = (teacher.teach or TeacherConfig()).task  # what model_task builds: the teacher's task
    proxy = cfg.proxy
    if proxy is None and game is not None:
        proxy = next((d.proxy for d in game.defenses if DEFENSES[d.kind].needs_proxy), None)
    return teacher, proxy or default_proxy(), task


# ---------------------------------------------------------------------------------------------------------------
# The step-order choice
# ---------------------------------------------------------------------------------------------------------------


def token_label(tok, i: int) -> str:
    """A token as a tick label: its text, with spaces, line breaks and unprintable bytes spelled out."""
    s = tok.decode([i])
    if s == " ":
        return "space"
    if not s:
        return f"#{i}"
    return s if s.isprintable() and s.strip() == s else s.encode("unicode_escape").decode().replace(" ", "␣")


@torch.no_grad()
def next_token_probs(model: torch.nn.Module, prefixes: list[list[int]], pad_id: int) -> torch.Tensor:
    """The model's next-token probabilities ``[N, V]`` after each prefix (right-padded batch, float32)."""
    lengths = torch.tensor([len(p) for p in prefixes])
    ids = torch.full((len(prefixes), int(lengths.max())), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prefixes):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    was = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    model.train(was)
    return torch.softmax(logits[torch.arange(len(prefixes)), lengths - 1], -1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def step_order_choices(task, tok, n: int) -> list[dict[str, Any]]:
    """Test problems of 3 operations whose valid solutions start with different tokens (another step first, or the
    first step's operands swapped where the task writes them both ways): the prompt's ids and, per first token, the
    first step it begins. Deterministic (seeded problems)."""
    out = []
    for p in task.problems("test", 8 * n, 3, seed=0):
        starts: dict[int, str] = {}
        prefix: list[int] = []
        for order in p.step_orders:
            for swapped in ((frozenset(), frozenset({order[0]})) if p.commute > 0 else (frozenset(),)):
                solution = p.solution(order, swapped)
                ids, labels = encode_example(tok, Example(prompt=p.prompt, completion=solution))
                k = next(i for i, lab in enumerate(labels) if lab != -100)
                prefix = ids[:k]
                starts.setdefault(ids[k], solution.split("\n", 1)[0].split("=", 1)[0] + " first")
        if len(starts) > 1:
            out.append({"prompt": p.prompt, "prefix": prefix, "starts": starts})
        if len(out) == n:
            break
    if not out:
        raise UserError("the task has no test problem whose valid solutions start differently")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run_explain(cfg: ExplainConfig, out: Path, source: Path | None = None, console: Console | None = None) -> Path:
    console = console or Console()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    game_dir = find_game(source) if source is not None else None
    game = load_config(game_dir / "config.yaml", GameConfig) if game_dir is not None else None
    out = Path(out)
    gif_dir = out / GIF_DIR
    page = ExplainerPage("distillarena, animated: what distillation and its defenses do")
    page.text("Every frame below is computed, not drawn by hand: the losses are the project's own objectives, "
              "the models are the built-in world's teacher and students, and the defenses are the ones the game and "
              "the server apply. Each animation is also saved as a GIF file next to this page.")
    fps, dpi = cfg.fps, cfg.dpi

    def lap(name: str, since: float) -> float:
        seconds[name] = time.perf_counter() - since
        return time.perf_counter()

    p0 = time.perf_counter()
    console.rule("[bold]1. Mode covering vs mode seeking")
    fit = fit_modes(cfg.modes.objectives, steps=cfg.modes.steps, record_every=cfg.modes.record_every,
                    lr=cfg.modes.lr)
    page.heading("1. Mode covering and mode seeking")
    gif = save_gif(modes_animation(fit), gif_dir / "modes.gif", fps=fps, dpi=dpi)
    page.animation(gif, "mode covering vs mode seeking", modes_caption(fit), f"{GIF_DIR}/modes.gif")
    p0 = lap("modes", p0)

    console.rule("[bold]2. Inside the built-in task")
    teacher_ref, proxy_ref, task_cfg = _run_models(cfg, game, game_dir, console)
    teacher, tok, teacher_path = resolve_model(teacher_ref, console)
    proxy, proxy_tok, proxy_path = resolve_model(proxy_ref, console)
    task = task_cfg.build()
    choices = step_order_choices(task, tok, cfg.students.probes)
    prefixes = [c["prefix"] for c in choices]
    t_probs = next_token_probs(teacher, prefixes, tok.pad_token_id)

    def balance(i: int) -> float:  # the teacher's probability of its second most likely valid first token
        return sorted((float(t_probs[i, t]) for t in choices[i]["starts"]), reverse=True)[1]

    show = max(range(len(choices)), key=balance)
    choice = choices[show]
    top = [int(i) for i in torch.topk(t_probs[show], 6).indices]
    ids = sorted(set(top) | set(choice["starts"]), key=lambda i: -float(t_probs[show, i]))
    view = TokenView(ids, [token_label(tok, i) for i in ids] + ["other"])
    orders = {token_label(tok, i): s for i, s in choice["starts"].items()}
    teacher_view = view.project(t_probs[show].numpy())
    p0 = lap("models", p0)

    frames = train_students(cfg, teacher, tok, proxy if cfg.students.start is None else None, task_cfg, choice,
                            prefixes, view, console)
    start = ("the defenses' proxy: the tiny preset briefly trained on the task" if cfg.students.start is None
             else "the configured start model")
    data = TaskFrames(choice["prompt"], view, orders, teacher_view, float(entropy(t_probs).mean()),
                      frames["steps"], frames["probs"], frames["entropy"], len(choices), start)
    page.heading("2. Inside the built-in task: a step-order choice")
    gif = save_gif(task_animation(data), gif_dir / "task.gif", fps=max(1, fps // 2), dpi=dpi)
    page.animation(gif, "students at a step-order choice", task_caption(data), f"{GIF_DIR}/task.gif")
    p0 = lap("students", p0)

    console.rule("[bold]3. What a defense does")
    # the holdout gradient as the game computes it (the teacher's completions at the game's decoding): one cache
    ad = DefenseConfig(kind="antidistillation", proxy=proxy_ref, holdout_traces=cfg.defenses.holdout_traces)
    gradient = defense_gradient(ad, proxy, proxy_tok, task, console, teacher, (game or GameConfig()).decoding)
    sweeps = defense_sweeps(cfg.defenses, teacher, tok, proxy, proxy_tok, gradient, choice["prefix"], view)
    page.heading("3. What a defense does to the teacher's next token")
    gif = save_gif(defense_animation(view, teacher_view, sweeps, choice["prompt"], orders),
                   gif_dir / "defenses.gif", fps=fps, dpi=dpi)
    page.animation(gif, "defenses at one position", defense_caption(view, teacher_view, sweeps),
                   f"{GIF_DIR}/defenses.gif")
    p0 = lap("defenses", p0)

    page.heading("4. The game's frontier, cell by cell")
    points = frontier_points(game_dir) if game_dir is not None else []
    if points:
        gif = save_gif(frontier_animation(points), gif_dir / "frontier.gif", fps=max(1, fps // 2), dpi=dpi)
        page.animation(gif, "the frontier traced out", frontier_caption(points, str(game_dir)),
                       f"{GIF_DIR}/frontier.gif")
    elif game_dir is not None:
        page.text(f"The game in {game_dir} has no cell with a defined recovery yet (the undefended students gained "
                  "nothing over the base student), so there is no frontier to trace.", note=True)
    else:
        page.text("Run `distillarena explain --from RUN_DIR` with a `distillarena demo` or `distillarena game` run "
                  "folder to watch its frontier traced out point by point here.", note=True)
    lap("frontier", p0)

    total = time.perf_counter() - t0
    page.heading("Run")
    page.table(["part", "seconds"], [[k, v] for k, v in seconds.items()] + [["total", total]])
    page.code(f"teacher: {teacher_path}\nproxy:   {proxy_path}" + (f"\ngame:    {game_dir}" if game_dir else ""))
    path = page.write(out / "explainer.html")
    atomic_write_json(gif_dir / "explainer.json", json_safe({
        "teacher": str(teacher_path), "proxy": str(proxy_path), "game": str(game_dir) if game_dir else None,
        "gifs": page.gifs, "seconds": seconds, "wall_seconds": total, "torch_threads": torch.get_num_threads()}))
    console.print(f"[bold green]explainer[/] {path}  ({total:.0f}s)")
    return path


def train_students(cfg: ExplainConfig, teacher: torch.nn.Module, tok, start: torch.nn.Module | None, task_cfg,
                   choice: dict[str, Any], prefixes: list[list[int]], view: TokenView,
                   console: Console) -> dict[str, Any]:
    """Train one student per objective with the distillation loop and watch it at the step-order choice: its
    probabilities over ``view`` after ``choice``'s prompt and its mean entropy over ``prefixes``."""
    s = cfg.students
    if start is None:
        start, _, _ = resolve_model(s.start, console)
    pool = [Encoded(*encode_example(tok, e)) for e in
            arithmetic_examples("train", s.train_size, task_cfg.n_ops, seed=0, config=task_cfg.arithmetic())]
    every = max(1, s.steps // s.frames)
    lt = LocalTeacher(teacher, tok)
    out: dict[str, Any] = {"probs": {}, "entropy": {}, "steps": []}
    for name in s.objectives:
        c0 = time.perf_counter()
        student = copy.deepcopy(start).float()
        for p in student.parameters():
            p.requires_grad_(True)
        steps, probs, ents = [], [], []

        def watch(step: int, student: torch.nn.Module = student, steps=steps, probs=probs, ents=ents) -> dict:
            q = next_token_probs(student, prefixes, tok.pad_token_id)
            steps.append(step)
            probs.append(view.project(next_token_probs(student, [choice["prefix"]], tok.pad_token_id)[0].numpy()))
            ents.append(float(entropy(q).mean()))
            return {}

        watch(0)
        stages = [Stage(1, s.steps, name)]
        acc = full_precision_accelerator()
        stream = DistillStream({"data": pool}, stages, batch_size=s.batch_size, grad_accum=1, seed=0,
                               pad_id=tok.pad_token_id)
        loss = DistillLoss(lt, stages, unwrap=acc.unwrap_model, seed=0)
        loop = LoopConfig(steps=s.steps, lr=s.lr, warmup_steps=min(10, s.steps // 10), eval_every=every,
                          log_every=10**9)
        student = train(student, stream, loss, loop, accelerator=acc, on_eval=watch)
        watch(s.steps)
        out["steps"] = steps
        out["probs"][name] = np.stack(probs)
        out["entropy"][name] = ents
        console.print(f"  {name} student: {s.steps} steps in {time.perf_counter() - c0:.1f}s, entropy at the "
                      f"choice {ents[0]:.2f} -> {ents[-1]:.2f}")
    return out


def defense_sweeps(d: ExplainDefenses, teacher: torch.nn.Module, tok, proxy: torch.nn.Module, proxy_tok,
                   gradient, prefix: list[int], view: TokenView) -> list[DefenseSweep]:
    """Each defense built by ``build_policy`` at ``d.frames`` strengths, applied to the teacher's logits after
    ``prefix`` exactly as the sampler applies it (its processors, then temperature / top-k / top-p), with ``d.draws``
    tokens sampled from the result. Every frame reuses the same random numbers, so the draws change only because
    the distribution does."""
    ids = torch.tensor([prefix])
    with torch.no_grad():
        z = teacher(input_ids=ids).logits[:, -1].float()
    kinds = [("temperature", "temperature", "T", "temperature", d.temperature,
              "Temperature flattens the teacher's distribution (T > 1) or sharpens it (T < 1)."),
             ("truncation", "top-p truncation", "p", "top_p", d.top_p,
              "Top-p keeps only the likeliest tokens that together reach probability p."),
             ("poe", "PoE", "γ", "gamma", d.gamma,
              "PoE mixes in a small proxy student's opinion with weight γ, down-weighting tokens the teacher likes "
              "but a student would not guess."),
             ("antidistillation", "antidistillation", "λ", "lam", d.lam,
              "Antidistillation adds λ times a push against tokens that would help the proxy student learn.")]
    sweeps = []
    for kind, title, symbol, param, (lo, hi), note in kinds:
        values = [float(v) for v in np.linspace(lo, hi, d.frames)]
        probs, draws = [], []
        for v in values:
            policy = build_policy(kind, {param: v}, teacher=teacher, tokenizer=tok, proxy=proxy,
                                  proxy_tokenizer=proxy_tok, gradient=gradient)
            for p in policy.processors:
                if hasattr(p, "reset"):
                    p.reset()
            chain = list(policy.processors) + sampling_warpers(policy.temperature, policy.top_k, policy.top_p)
            with torch.no_grad():
                q = torch.softmax(apply_processors(chain, ids, z.clone()), -1)
            gen = torch.Generator().manual_seed(0)
            tokens = sample_from_probs(q.expand(d.draws, -1).contiguous(), generator=gen)
            probs.append(view.project(q[0].numpy()))
            draws.append(view.count(tokens.numpy()))
        sweeps.append(DefenseSweep(kind, title, symbol, values, np.stack(probs), np.stack(draws), d.draws, note))
    if not all(math.isfinite(float(x)) for s in sweeps for x in s.probs.ravel()):
        raise RuntimeError("a defense gave a non-finite distribution")
    return sweeps
