"""The explainer's animations and page (``distillarena explain``): each animation is drawn from numbers the project's
own code computed, saved as a GIF (matplotlib's animation, Pillow writer: no external program) and embedded in a
self-contained ``explainer.html`` with a few plain words beside it.

- :func:`fit_modes`: a two-humped teacher over a small vocabulary and a one-humped student fitted step by step by
  each objective through :func:`~distillarena.objectives.compute_objective` (the toy of "mode covering vs mode
  seeking", computed here because it needs nothing but the objectives);
- :func:`modes_animation`, :func:`task_animation`, :func:`defense_animation`, :func:`frontier_animation`: one
  figure each, from :class:`ModeFit`, :class:`TaskFrames`, :class:`DefenseSweep` and :class:`FrontierPoint` (the
  recipe ``distillarena.recipes.explain`` computes the last three with real models);
- the captions (:func:`modes_caption` ...), which quote the computed numbers;
- :func:`save_gif` and :class:`ExplainerPage`, a :class:`~distillarena.report.html.Report` that embeds GIFs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import PillowWriter  # noqa: E402

from distillarena.objectives import TeacherSignal, compute_objective, get_objective  # noqa: E402
from distillarena.report.html import Report  # noqa: E402

OBJECTIVE_NAMES = {"fkl": "forward KL", "rkl": "reverse KL", "jsd": "JSD (β = 0.5)", "hpd": "HPD", "sft": "SFT",
                   "tvd": "total variation", "seqkd": "SeqKD"}
COLORS = {"fkl": "#0077bb", "rkl": "#cc3311", "jsd": "#009988", "hpd": "#ee7733", "sft": "#0077bb",
          "tvd": "#aa3377", "seqkd": "#33bbee"}
TEACHER_COLOR = "#9a9a9a"
DEFENSE_COLORS = {"temperature": "#4477aa", "truncation": "#228833", "poe": "#aa3377", "antidistillation": "#ee6677"}
HOLD_FRAMES = 8  # the last frame is shown this many frames longer before the GIF loops


def _color(name: str, i: int = 0) -> str:
    return COLORS.get(name, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


def objective_name(name: str) -> str:
    return OBJECTIVE_NAMES.get(name, name)


# ---------------------------------------------------------------------------------------------------------------
# 1. Mode covering vs mode seeking: a toy fitted by the objectives themselves
# ---------------------------------------------------------------------------------------------------------------

TEACHER_HUMPS = ((-2.0, 0.55, 0.55), (2.0, 0.55, 0.45))  # (centre, width, weight) of the teacher's two humps


@dataclass
class ModeFit:
    """A one-humped student fitted to a two-humped teacher by each objective.

    grid: ``[V]`` the tokens' positions on a line; teacher: ``[V]`` its probabilities; steps: the recorded steps;
    students: objective -> ``[frames, V]`` the student's probabilities at those steps; losses: objective ->
    ``[steps]`` the loss per position that the objective returned at each step (before that step's update);
    fkl / rkl: objective -> ``[steps + 1]`` the student's exact forward KL(teacher || student) and reverse
    KL(student || teacher) at each step, by ``compute_objective("fkl")`` / ``("rkl")``: one yardstick for all.
    """

    grid: np.ndarray
    teacher: np.ndarray
    steps: list[int]
    students: dict[str, np.ndarray]
    losses: dict[str, np.ndarray]
    fkl: dict[str, np.ndarray]
    rkl: dict[str, np.ndarray]
    split: float = 0.0  # the humps lie on either side of this point

    def left_share(self, name: str, frame: int = -1) -> float:
        """Probability the student puts left of ``split`` (on the left hump) at ``frame``."""
        return float(self.students[name][frame][self.grid < self.split].sum())

    def teacher_left_share(self) -> float:
        return float(self.teacher[self.grid < self.split].sum())

    def moments(self, probs: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation of a distribution over the grid."""
        m = float((probs * self.grid).sum())
        return m, float(math.sqrt((probs * (self.grid - m) ** 2).sum()))


def teacher_humps(grid: torch.Tensor) -> torch.Tensor:
    """The toy teacher's log-probabilities over ``grid``: a mixture of two discretised Gaussian humps."""
    p = sum(w * torch.exp(-((grid - c) ** 2) / (2 * s * s)) for c, s, w in TEACHER_HUMPS)
    return torch.log(p / p.sum())


def fit_modes(objectives: Sequence[str] = ("fkl", "rkl", "jsd", "hpd"), *, steps: int = 300, record_every: int = 5,
              lr: float = 0.05, vocab: int = 41, positions: int = 256, seed: int = 0) -> ModeFit:
    """Fit a student of one hump (logits ``-(x - mu)^2 / (2 s^2)``: two parameters) to the two-humped teacher by
    each objective with Adam, starting from a narrow hump just right of the middle. Divergences see the teacher's
    whole distribution at one position; objectives that learn from label tokens (``needs_labels``: HPD, the
    one-hot estimators) get ``positions`` tokens sampled from the teacher at every step, as a dataset would give."""
    grid = torch.linspace(-4.0, 4.0, vocab, dtype=torch.float64)
    lp = teacher_humps(grid)
    students: dict[str, np.ndarray] = {}
    losses: dict[str, np.ndarray] = {}
    fkl: dict[str, np.ndarray] = {}
    rkl: dict[str, np.ndarray] = {}
    recorded = [s for s in range(steps + 1) if s % record_every == 0 or s == steps]
    for name in objectives:
        spec = get_objective(name)
        gen = torch.Generator().manual_seed(seed)
        mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        log_s = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([mu, log_s], lr=lr)
        frames, curve, fs, rs = [], [], [], []
        for step in range(steps + 1):
            logits = -((grid - mu) ** 2) / (2 * torch.exp(log_s) ** 2)
            if step in recorded:
                frames.append(torch.softmax(logits.detach(), -1).numpy())
            with torch.no_grad():
                fs.append(float(compute_objective("fkl", logits[None], TeacherSignal.dense(lp[None])).loss_sum))
                rs.append(float(compute_objective("rkl", logits[None], TeacherSignal.dense(lp[None])).loss_sum))
            if step == steps:
                break
            if spec.needs_labels:
                labels = torch.multinomial(lp.exp().float(), positions, replacement=True, generator=gen)
                out = compute_objective(name, logits.expand(positions, -1),
                                        TeacherSignal.dense(lp.expand(positions, -1)), labels, generator=gen)
            else:
                out = compute_objective(name, logits[None], TeacherSignal.dense(lp[None]), generator=gen)
            loss = out.loss_sum / out.count
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
        students[name] = np.stack(frames)
        losses[name] = np.array(curve)
        fkl[name], rkl[name] = np.array(fs), np.array(rs)
    return ModeFit(grid.numpy(), lp.exp().numpy(), recorded, students, losses, fkl, rkl)


@dataclass
class Animation:
    """A figure and ``draw(i)``, which updates it to show frame ``i`` (the protocol of matplotlib's
    ``FuncAnimation``); :func:`save_gif` renders ``frames`` in order, each once."""

    fig: plt.Figure
    draw: Callable[[int], object]
    frames: list[int]


def _laid_out(fig: plt.Figure, draw: Callable[[int], object], frames: list[int], top: float = 1.0) -> Animation:
    """The animation, laid out around its last frame (titles and labels at their longest, so none overlaps)."""
    draw(frames[-1])
    fig.tight_layout(rect=(0, 0, 1, top))
    return Animation(fig, draw, frames)


def _hold(n: int, hold: int = HOLD_FRAMES) -> list[int]:
    return list(range(n)) + [n - 1] * hold


def modes_animation(fit: ModeFit) -> Animation:
    names = list(fit.students)
    fig, axes = plt.subplots(2, len(names), figsize=(2.55 * len(names) + 0.6, 5.6),
                             gridspec_kw={"height_ratios": [1.5, 1]}, squeeze=False)
    width = float(fit.grid[1] - fit.grid[0])
    edges = np.append(fit.grid - width / 2, fit.grid[-1] + width / 2)
    top = 1.15 * max(float(fit.teacher.max()), max(float(s.max()) for s in fit.students.values()))
    curves = [c for n in names for c in (fit.fkl[n], fit.rkl[n])]
    lo = max(min(float(np.min(c)) for c in curves), 1e-3) / 1.6
    hi = max(float(np.max(c)) for c in curves) * 1.6
    n_steps = fit.steps[-1]
    lines, texts, moving = [], [], []
    for j, name in enumerate(names):
        ax, lx = axes[0, j], axes[1, j]
        color = _color(name, j)
        ax.stairs(fit.teacher, edges, fill=True, color=TEACHER_COLOR, alpha=0.55, label="teacher")
        (line,) = ax.plot(fit.grid, fit.students[name][0], "-", color=color, lw=2.2, label="student")
        ax.set(ylim=(0, top), xlim=(edges[0], edges[-1]), title=f"trained with {objective_name(name)}")
        ax.set_xlabel("token (its place on a line)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.set_ylabel("probability")
            ax.legend(loc="upper left", fontsize=7, frameon=False)
        else:
            ax.tick_params(labelleft=False)
        texts.append(ax.text(0.98, 0.97, "", transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                             color=color))
        lines.append(line)
        steps = np.arange(n_steps + 1)
        lx.plot(steps, fit.fkl[name], "-", color=color, alpha=0.15, lw=1)
        lx.plot(steps, fit.rkl[name], "--", color=color, alpha=0.15, lw=1)
        (f,) = lx.plot([], [], "-", color=color, lw=1.8, label="forward KL")
        (r,) = lx.plot([], [], "--", color=color, lw=1.8, label="reverse KL")
        lx.set(xlim=(0, max(n_steps, 1)), ylim=(lo, hi), yscale="log")
        lx.set_xlabel("step", fontsize=8)
        lx.grid(alpha=0.3)
        if j == 0:
            lx.set_ylabel("distance to teacher (nats)", fontsize=8.5)
            lx.legend(loc="upper right", fontsize=7, frameon=False)
        else:
            lx.tick_params(labelleft=False)
        moving.append((f, r))
    title = fig.suptitle("")

    def draw(k: int):
        step = fit.steps[k]
        title.set_text(f"one teacher with two humps, one student with one hump: step {step} of {n_steps}")
        for j, name in enumerate(names):
            lines[j].set_ydata(fit.students[name][k])
            left = float(fit.students[name][k][fit.grid < fit.split].sum())
            texts[j].set_text(f"left hump {left:.0%}\nright hump {1 - left:.0%}")
            f, r = moving[j]
            f.set_data(np.arange(step + 1), fit.fkl[name][: step + 1])
            r.set_data(np.arange(step + 1), fit.rkl[name][: step + 1])
        return [*lines, *texts, *(a for m in moving for a in m), title]

    return _laid_out(fig, draw, _hold(len(fit.steps)), top=0.95)


def modes_caption(fit: ModeFit) -> list[str]:
    t = fit.teacher_left_share()
    ends = ", ".join(f"{objective_name(n)} {fit.left_share(n):.0%} / {1 - fit.left_share(n):.0%}"
                     for n in fit.students)
    return [
        "What to watch: the grey bars are a teacher that likes two different answers (two humps). The coloured "
        "curve is a student that can only make one hump. Each column trains that student with a different loss.",
        "Forward KL is punished wherever the teacher has probability and the student has none, so its student "
        "stretches over both humps, even if that puts probability in the valley between them. Reverse KL is "
        "punished wherever the student puts probability the teacher does not, so its student slides onto one "
        "hump and gives up the other.",
        f"Where each student ends (left hump / right hump): {ends}; the teacher: {t:.0%} / {1 - t:.0%}.",
        "The bottom row measures every student the same two ways: forward KL (solid: how much of what the teacher "
        "says the student misses) and reverse KL (dashed: how much the student says that the teacher would not). "
        "Each loss drives down its own kind of distance and pays in the other.",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Shared: the tokens an animation shows at one position
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenView:
    """The tokens shown at one position (the teacher's likeliest, by id) and an "other" bar for the rest."""

    ids: list[int]
    labels: list[str]  # one tick label per shown token, then "other"

    def project(self, probs: np.ndarray) -> np.ndarray:
        """``[..., V]`` probabilities -> ``[..., K + 1]``: the shown tokens, then everything else."""
        probs = np.asarray(probs, dtype=np.float64)
        shown = probs[..., self.ids]
        return np.concatenate([shown, 1.0 - shown.sum(-1, keepdims=True).clip(max=1.0)], axis=-1).clip(min=0.0)

    def count(self, tokens: np.ndarray) -> np.ndarray:
        """Sampled token ids ``[n]`` -> counts ``[K + 1]`` over the shown tokens and "other"."""
        where = {t: i for i, t in enumerate(self.ids)}
        out = np.zeros(len(self.ids) + 1, dtype=np.int64)
        for t in np.asarray(tokens).tolist():
            out[where.get(int(t), len(self.ids))] += 1
        return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Inside the built-in task: the teacher at a step-order choice and students trained on it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TaskFrames:
    """Students trained with each objective, watched at one step-order choice of the built-in task.

    teacher / students: probabilities over ``view`` (``[K + 1]`` / ``[frames, K + 1]``) at the first answer token
    of ``prompt``; entropy: mean next-token entropy (nats) at that choice over ``n_probes`` problems, per frame.
    """

    prompt: str
    view: TokenView
    orders: dict[str, str]  # token label -> the step it starts ("57-39 first")
    teacher: np.ndarray
    teacher_entropy: float
    steps: list[int]
    students: dict[str, np.ndarray]
    entropy: dict[str, list[float]]
    n_probes: int
    start: str = ""  # what the students start from, in words


def task_animation(data: TaskFrames) -> Animation:
    names = list(data.students)
    fig, (ax, ex) = plt.subplots(1, 2, figsize=(10.4, 4.3), gridspec_kw={"width_ratios": [1.7, 1]})
    k = len(data.view.labels)
    n = len(names) + 1
    w = 0.8 / n
    xs = np.arange(k)
    ax.bar(xs - 0.4 + w / 2, data.teacher, width=w, color=TEACHER_COLOR, label="teacher")
    bars = []
    for i, name in enumerate(names):
        bars.append(ax.bar(xs - 0.4 + w * (i + 1.5), data.students[name][0], width=w, color=_color(name, i),
                           label=f"{objective_name(name)} student"))
    ticks = [f"{lab}\n{data.orders[lab]}" if lab in data.orders else lab for lab in data.view.labels]
    ax.set_xticks(xs, ticks, fontsize=8)
    ax.set(ylim=(0, 1.06), ylabel="probability of the next token")
    ax.set_title(f"first token of the answer to: {data.prompt.strip()}", fontsize=9.5)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ex.axhline(data.teacher_entropy, color="k", ls="--", lw=1.2, label="teacher")
    curves = []
    for i, name in enumerate(names):
        (c,) = ex.plot([], [], "o-", color=_color(name, i), ms=3.5, lw=1.8, label=objective_name(name))
        curves.append(c)
    top = max([data.teacher_entropy] + [v for e in data.entropy.values() for v in e if math.isfinite(v)])
    ex.set(xlim=(0, max(data.steps[-1], 1)), ylim=(0, 1.15 * top), xlabel="training step",
           ylabel="entropy at the choice (nats)")
    ex.set_title(f"how undecided at the first step, mean of\n{data.n_probes} problems with several ways to begin",
                 fontsize=9.5)
    ex.legend(fontsize=8, loc="lower right", frameon=False)
    ex.grid(alpha=0.3)
    title = fig.suptitle("")

    def draw(f: int):
        title.set_text(f"students learning from the teacher: training step {data.steps[f]} of {data.steps[-1]}")
        for i, name in enumerate(names):
            for b, h in zip(bars[i], data.students[name][f], strict=True):
                b.set_height(h)
            curves[i].set_data(data.steps[: f + 1], data.entropy[name][: f + 1])
        return [title, *curves] + [b for group in bars for b in group]

    return _laid_out(fig, draw, _hold(len(data.steps)), top=0.93)


def task_caption(data: TaskFrames) -> list[str]:
    orders = [lab for lab in data.view.labels if lab in data.orders]
    share = {n: ", ".join(f"'{o}' {data.students[n][-1][data.view.labels.index(o)]:.0%}" for o in orders)
             for n in data.students}
    t = ", ".join(f"'{o}' {data.teacher[data.view.labels.index(o)]:.0%}" for o in orders)
    idx = [data.view.labels.index(o) for o in orders]
    valid = {n: float(data.students[n][-1][idx].sum()) for n in data.students}
    ends = "; ".join(f"{objective_name(n)}: {share[n]} ({valid[n]:.0%} on a valid first step), entropy "
                     f"{data.entropy[n][-1]:.2f}" for n in data.students)
    return [
        f"What to watch: \"{data.prompt.strip()}\" can be solved starting with either sub-expression (and, where the "
        "task writes sums and products both ways, with its two numbers in either order), so the first token of the "
        "answer is a genuine choice. The teacher learned several ways to begin and splits its first token between "
        f"them (grey). The students ({data.start}) are trained on the same problems, one with each loss.",
        "SFT copies the example solutions token by token; HPD also looks at the teacher's whole distribution and "
        "at what the student itself would say. On the right: how undecided each model is at such choices, on "
        "average. A student near the dashed line keeps the teacher's options open; one far below it has settled on "
        "one way; one far above it is still unsure of everything.",
        f"At step {data.steps[-1]}: teacher {t} ({float(data.teacher[idx].sum()):.0%} on a valid first step), "
        f"entropy {data.teacher_entropy:.2f}; {ends}.",
    ]


# ---------------------------------------------------------------------------------------------------------------
# 3. What a defense does to the teacher's distribution at one position
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DefenseSweep:
    """One defense with its main parameter slid over ``values``: the distribution it samples from (over the view,
    ``[frames, K + 1]``) and the counts of ``n_draws`` tokens actually sampled from it (``[frames, K + 1]``)."""

    kind: str
    title: str  # "PoE"
    param: str  # "γ"
    values: list[float]
    probs: np.ndarray
    draws: np.ndarray
    n_draws: int
    note: str = ""  # what the parameter does, in words


def defense_animation(view: TokenView, teacher: np.ndarray, sweeps: list[DefenseSweep], prompt: str,
                      orders: dict[str, str] | None = None) -> Animation:
    orders = orders or {}
    cols = 2
    rows = math.ceil(len(sweeps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10.4, 3.0 * rows + 0.7), squeeze=False)
    frames = max(len(s.values) for s in sweeps)
    xs = np.arange(len(view.labels))
    ticks = [f"{lab}\n{orders[lab]}" if lab in orders else lab for lab in view.labels]
    parts = []
    for i, s in enumerate(sweeps):
        ax = axes[i // cols, i % cols]
        color = DEFENSE_COLORS.get(s.kind, "#4477aa")
        ax.bar(xs, teacher, width=0.78, fill=False, edgecolor="#333", lw=1.0, label="undefended teacher")
        bars = ax.bar(xs, s.probs[0], width=0.78, color=color, alpha=0.75, label="after the defense")
        (dots,) = ax.plot(xs, s.draws[0] / s.n_draws, "o", color="k", ms=4.5, label=f"share of {s.n_draws} draws")
        ax.set(ylim=(0, 1.06))
        ax.set_xticks(xs, ticks, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("probability")
        if i == 0:
            ax.legend(fontsize=7, loc="upper right", frameon=False)
        t = ax.set_title("", fontsize=10)
        parts.append((s, bars, dots, t))
    for j in range(len(sweeps), rows * cols):
        axes[j // cols, j % cols].set_visible(False)
    fig.suptitle(f"one position, four defenses: the first token of the answer to {prompt.strip()}", fontsize=10)

    def draw(f: int):
        out = []
        for s, bars, dots, t in parts:
            g = min(f, len(s.values) - 1)
            for b, h in zip(bars, s.probs[g], strict=True):
                b.set_height(h)
            dots.set_ydata(s.draws[g] / s.n_draws)
            t.set_text(f"{s.title}: {s.param} = {s.values[g]:.2f}")
            out += [*bars, dots, t]
        return out

    return _laid_out(fig, draw, _hold(frames), top=0.95)


def defense_caption(view: TokenView, teacher: np.ndarray, sweeps: list[DefenseSweep]) -> list[str]:
    top = int(np.argmax(teacher[:-1]))
    tok = view.labels[top]
    moves = "; ".join(f"{s.title} from {s.param} = {s.values[0]:g} to {s.values[-1]:g}: the teacher's favourite "
                      f"'{tok}' goes from {s.probs[0][top]:.0%} to {s.probs[-1][top]:.0%} "
                      f"({s.draws[0][top]} then {s.draws[-1][top]} of {s.n_draws} draws)" for s in sweeps)
    notes = " ".join(s.note for s in sweeps if s.note)
    return [
        "What to watch: the outlined bars are what the undefended teacher would say next; the coloured bars are "
        "what it says under a defense as its strength slides up; the dots are the tokens actually drawn. A student "
        "only ever sees the draws, so a defense works by changing them.",
        notes,
        moves + ".",
    ]


# ---------------------------------------------------------------------------------------------------------------
# 4. The frontier traced point by point
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FrontierPoint:
    """One cell of a game (a defense at one strength against one attacker), mean over its seeds."""

    defense: str  # the defense's label ("poe(gamma=0.5)"), "none" for the undefended teacher
    kind: str
    attacker: str
    recovery: float  # student capability recovered, 1 = as much as from the undefended teacher
    utility: float  # teacher accuracy on the queries


def frontier_animation(points: list[FrontierPoint], frames_per_point: int = 4) -> Animation:
    fig, ax = plt.subplots(figsize=(10.4, 5.0))
    xs = [p.recovery for p in points]
    ys = [p.utility for p in points]
    xpad = 0.1 * ((max(xs) - min(xs)) or 1.0)
    ypad = 0.1 * ((max(ys) - min(ys)) or 0.2)
    ax.set(xlim=(min(min(xs), 0.0) - xpad, max(max(xs), 1.0) + xpad), ylim=(max(0.0, min(ys) - ypad),
                                                                          min(1.0, max(ys) + ypad) + 0.02),
           xlabel="student capability recovered (1 = as much as from the undefended teacher)",
           ylabel="teacher utility (accuracy of its answers)")
    ax.axvline(1.0, color="#999", lw=0.8)
    ax.grid(alpha=0.3)
    refs = {p.attacker: i for i, p in enumerate(points) if p.defense == "none"}  # the undefended teacher
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(points):
        if p.defense != "none":
            groups.setdefault((p.kind, p.attacker), []).append(i)
    kinds = list(dict.fromkeys(p.kind for p in points if p.defense != "none"))
    attackers = list(dict.fromkeys(p.attacker for p in points))
    palette = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"]
    markers = ["o", "s", "^", "D", "v", "P"]
    lines = {}
    for kind, att in groups:
        (ln,) = ax.plot([], [], marker=markers[attackers.index(att) % len(markers)], ms=7, lw=1.4,
                        color=palette[kinds.index(kind) % len(palette)],
                        ls="--" if att.startswith("passive") else "-", label=f"{kind} / {att}")
        lines[(kind, att)] = ln
    for att in refs:
        (ln,) = ax.plot([], [], marker=markers[attackers.index(att) % len(markers)], ms=8, color="#222", ls="none",
                        label=f"no defense / {att}")
        lines[("none", att)] = ln
    (ring,) = ax.plot([], [], "o", ms=16, mfc="none", mec="k", mew=1.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="defense / attacker",
              title_fontsize=8)
    title = ax.set_title("", fontsize=10)

    def draw(f: int):
        n = min(f // frames_per_point + 1, len(points))
        for (kind, att), ln in lines.items():
            shown = [refs[att]] if att in refs and refs[att] < n else []
            if kind != "none":
                shown += sorted((i for i in groups[(kind, att)] if i < n), key=lambda i: -points[i].utility)
            ln.set_data([points[i].recovery for i in shown], [points[i].utility for i in shown])
        p = points[n - 1]
        ring.set_data([p.recovery], [p.utility])
        what = "no defense" if p.defense == "none" else p.defense
        worse = " (it ends worse than it started)" if p.recovery < 0 else ""
        title.set_text(f"the game's frontier, cell {n} of {len(points)}: {what} against the {p.attacker} student\n"
                       f"the student recovers {p.recovery:.2f}{worse}; the teacher keeps {p.utility:.0%} accuracy")
        return [*lines.values(), ring, title]

    return _laid_out(fig, draw, _hold(len(points) * frames_per_point, 2 * frames_per_point))


def frontier_caption(points: list[FrontierPoint], source: str) -> list[str]:
    return [
        "What to watch: each point is one game cell: the teacher under one defense at one strength, and a student "
        "that bought traces from it and trained on them. Up is a teacher that still answers well; left is a student "
        "that learned less than it would from the undefended teacher (the grey line at 1).",
        "A good defense moves points left without moving them down. Each line joins one defense's strengths against "
        "one attacker, starting at the undefended teacher; dashed lines are passive students, solid ones adaptive. "
        "Below 0, the student ended worse than before it trained on the traces.",
        f"From the game in {source} ({len(points)} cells with a defined recovery).",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Files and the page
# ---------------------------------------------------------------------------------------------------------------


def save_gif(anim: Animation, path: Path, *, fps: int = 8, dpi: int = 80) -> bytes:
    """Write ``anim`` as a looping GIF at ``path`` with matplotlib's Pillow writer (via a temporary file, then
    renamed) and return its bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.gif")
    writer = PillowWriter(fps=fps)
    try:
        with writer.saving(anim.fig, str(tmp), dpi):
            for i in anim.frames:
                anim.draw(i)
                writer.grab_frame()
        tmp.replace(path)
    finally:
        plt.close(anim.fig)
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


EXTRA_STYLE = ("body{max-width:1280px}"
               ".anim{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start;margin:.6em 0 1.4em}"
               ".anim img{max-width:100%;border:1px solid #eee}.anim .cap{flex:1 1 260px;min-width:240px;"
               "font-size:.95em;line-height:1.4}.anim .cap p{margin:.2em 0 .7em}.anim .file{color:#777;"
               "font-size:.85em}")


@dataclass
class ExplainerPage(Report):
    """A :class:`Report` whose animations are GIFs embedded as data (the page opens offline and animates)."""

    gifs: list[str] = field(default_factory=list)

    def animation(self, gif: bytes, alt: str, caption: Sequence[str], file: str = "") -> None:
        data = base64.b64encode(gif).decode()
        cap = "".join(f"<p>{html.escape(c)}</p>" for c in caption if c)
        if file:
            cap += f"<p class='file'>also saved as {html.escape(file)}</p>"
        self.parts.append(f"<div class='anim'><img src='data:image/gif;base64,{data}' alt='{html.escape(alt)}'>"
                          f"<div class='cap'>{cap}</div></div>")
        self.gifs.append(file or alt)

    def html(self) -> str:
        return super().html().replace("</style>", EXTRA_STYLE + "</style>", 1)
