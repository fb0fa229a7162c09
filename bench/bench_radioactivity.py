"""Radioactivity on the built-in world: is a student distilled from a watermarked teacher detected, how much
watermarked data does it take, and what does the watermark cost the teacher?

    .venv/bin/python bench/bench_radioactivity.py --out /tmp/radioactivity     # writes <out>/results.json
    .venv/bin/python bench/bench_radioactivity.py --quick --out /tmp/r-quick    # smaller, for a smoke test

The game's world and defaults: the built-in teacher sampling at temperature 0.7 / top-p 0.95, the game's student
(the small preset under-trained on 1- and 2-operation problems), ``budget`` 2-operation train prompts, the
game's training run (250 steps). Per watermark strength ``delta`` the teacher answers the same prompts with the
same seed as undefended; its cost is the paired accuracy difference on those prompts (bootstrap 95% interval).
For each fraction ``f`` of watermarked training data a student is trained on the watermarked traces of a random
``f`` share of the prompts and the undefended traces of the rest, then tested with open weights (``detect_open``),
reading (a) the watermarked traces it was served (the provider's log) and (b) reference solutions of test
problems it never saw. The ``f = 0`` student is the null case: it is also tested against ``--null-keys`` other keys.
Where the watermark can live: the share of completion tokens where the teacher's sampled distribution has entropy
above 0.1 nats, and the distinct (window, token) pairs per window width.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from distillarena.attacks.plan import Plan
from distillarena.core.io import atomic_write_json
from distillarena.defenses.watermark import WatermarkScheme
from distillarena.evaluate.task_eval import evaluate_problems
from distillarena.forensics import detect_open, detect_text
from distillarena.game.attack import encode_traces, train_student
from distillarena.game.collect import load_traces
from distillarena.game.config import AttackerConfig, DefenseConfig, GameConfig
from distillarena.game.sweep import Game
from distillarena.report.stats import paired_difference
from distillarena.tasks.data import problem_example

KEY = "bench-radioactivity"


def teacher_entropy(game: Game, records: list[dict], decoding: dict, n: int = 256) -> dict:
    """Entropy of the teacher's sampled distribution (temperature and top-p applied) at each completion token of
    ``n`` undefended traces: the share of positions that can carry a watermark at all."""
    model, tok, _ = game.teacher()
    ents = []
    with torch.no_grad():
        for r in records[:n]:
            p = tok(r["prompt"])["input_ids"]
            ids = torch.tensor([p + list(r["tokens"])])
            logits = model(ids).logits[0, len(p) - 1 : -1].float() / decoding.get("temperature", 1.0)
            probs = logits.softmax(-1)
            top_p = decoding.get("top_p")
            if top_p is not None:  # nucleus cut as the sampler's TopPProcessor
                sp, si = probs.sort(-1)
                drop = sp.cumsum(-1) <= 1 - top_p
                drop[:, -1] = False
                probs = probs.masked_fill(drop.scatter(-1, si, drop), 0.0)
                probs = probs / probs.sum(-1, keepdim=True)
            ents.extend((-(probs * probs.clamp_min(1e-30).log()).sum(-1)).tolist())
    e = np.array(ents)
    return {"tokens": int(e.size), "share_above_0.1": float((e > 0.1).mean()),
            "share_above_0.5": float((e > 0.5).mean()), "mean_entropy": float(e.mean())}


def distinct_pairs(records: list[dict], tok, contexts=(1, 2, 4, 6)) -> dict:
    """Distinct (window, token) pairs among the traces' completion tokens, per window width."""
    out = {}
    enc = [(tok(r["prompt"])["input_ids"], list(r["tokens"])) for r in records]
    for h in contexts:
        pairs = set()
        n = 0
        for p, t in enc:
            ids = p + t
            for i in range(len(p), len(ids)):
                pairs.add((tuple(ids[max(0, i - h) : i]), ids[i]))
                n += 1
        out[str(h)] = {"positions": n, "distinct_pairs": len(pairs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.05, 0.0])
    ap.add_argument("--fraction-delta", type=float, default=2.0, help="the delta of the fraction sweep")
    ap.add_argument("--context", type=int, default=4)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", type=int, default=512, help="reference solutions read by the students")
    ap.add_argument("--null-keys", type=int, default=20)
    ap.add_argument("--min-entropy", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                    help="entropy floors of the open-weights test (nats; the first is the headline)")
    ap.add_argument("--teacher", help="a model folder instead of the built-in teacher (smoke tests)")
    ap.add_argument("--student", help="a model folder instead of the game's student (smoke tests)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.budget, args.steps, args.reference, args.null_keys = 128, 20, 64, 5
        args.deltas, args.fractions = [2.0], [1.0, 0.0]
    console = Console()
    over = {"teacher": {"path": args.teacher}} if args.teacher else {}
    if args.student:
        over["student"] = {"path": args.student}
    cfg = GameConfig.model_validate({"budget": args.budget, "prompts": {"pool": max(args.budget, 2048)},
                                     "train": {"steps": args.steps}, **over})
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    game = Game(cfg, out / "game", console)
    t_start = time.perf_counter()
    wm = {"key": KEY, "context": args.context, "gamma": args.gamma}
    scheme = WatermarkScheme(KEY, args.gamma, args.context)
    res: dict = {"settings": {**vars(args), "out": str(out), "decoding": cfg.decoding.params(), "key": KEY},
                 "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                             "loadavg_start": os.getloadavg()}}

    # --- the teacher: undefended and watermarked traces of the same prompts, same seed --------------------------
    traces = {}
    for delta in sorted({*args.deltas, args.fraction_delta}):
        d = DefenseConfig(kind="watermark", params={"delta": delta, **wm})
        folder, meta = game.traces(d, args.seed)
        traces[delta] = load_traces(folder)
    folder, _ = game.traces(DefenseConfig(kind="none"), args.seed)
    clean = load_traces(folder)
    _, tok, _ = game.teacher()
    res["where_the_watermark_can_live"] = {"teacher_entropy": teacher_entropy(game, clean, cfg.decoding.params()),
                                           "distinct_pairs": distinct_pairs(clean, tok)}
    base_correct = np.array([float(r["correct"]) for r in clean])
    res["teacher"] = {"undefended_accuracy": float(base_correct.mean()), "n": len(clean)}
    for delta, recs in traces.items():
        x = np.array([float(r["correct"]) for r in recs])
        diff = paired_difference(x[None, :], base_correct[None, :])
        text = detect_text(scheme, tok, [(r["prompt"], r["completion"]) for r in recs], examples=0)
        res["teacher"][f"delta={delta:g}"] = {
            "accuracy": float(x.mean()), "accuracy_cost": diff.as_dict(),
            "step_validity": float(np.mean([r["step_validity"] for r in recs])),
            "kl_to_undefended": float(np.mean([r["kl_to_undefended"] for r in recs])),
            "text_detection": text.as_dict()}
        console.print(f"teacher delta {delta:g}: accuracy {x.mean():.3f} (undefended {base_correct.mean():.3f}, "
                      f"paired difference {diff.format(3)}), its own text: p {text.p_value:.3g} "
                      f"(green {text.green}/{text.scored})")

    # --- students trained on a fraction of watermarked traces ---------------------------------------------------
    base_model, stok, _ = game.student()
    pad = stok.pad_token_id if stok.pad_token_id is not None else 0
    problems = game.task.problems("test", args.reference, cfg.prompts.n_ops, seed=3)
    reference = [(ex.prompt, ex.completion) for ex in (problem_example(p) for p in problems)]
    attacker = AttackerConfig(kind="passive")
    marked_all = traces[args.fraction_delta]
    res["students"] = []
    for frac in args.fractions:
        rng = random.Random(args.seed)
        idx = list(range(len(clean)))
        rng.shuffle(idx)
        chosen = set(idx[: round(frac * len(clean))])
        mixed = [marked_all[i] if i in chosen else clean[i] for i in range(len(clean))]
        enc, _ = encode_traces(mixed, stok, objective="sft")
        t0 = time.perf_counter()
        student = train_student(copy.deepcopy(base_model), enc, Plan.uniform(list(range(len(enc)))), None, attacker,
                                cfg, seed=args.seed, pad_id=pad)
        train_s = time.perf_counter() - t0
        ev = evaluate_problems(student, stok, game.test[:500], max_new_tokens=cfg.eval.max_new_tokens, task=game.task)
        served = [(marked_all[i]["prompt"], marked_all[i]["completion"]) for i in sorted(chosen)]
        student.save_pretrained(out / "students" / f"fraction-{frac:g}")  # for later tests (3 MB)
        row = {"fraction": frac, "watermarked_traces": len(chosen), "train_s": train_s,
               "student_accuracy": ev.accuracy, "student_accuracy_n": ev.n}
        for h in args.min_entropy:  # the entropy floor (on the student's own entropy): forced tokens carry nothing
            row[f"open_reference@{h:g}"] = detect_open(scheme, student, stok, reference, min_entropy=h,
                                                       examples=0).as_dict()
            if served:
                row[f"open_served@{h:g}"] = detect_open(scheme, student, stok, served, min_entropy=h,
                                                        examples=0).as_dict()
        row["open_reference"] = row[f"open_reference@{args.min_entropy[0]:g}"]
        if served:
            row["open_served"] = row[f"open_served@{args.min_entropy[0]:g}"]
        if frac == 0.0:  # the null: the clean student against other keys, at every entropy floor
            for h in args.min_entropy:
                row[f"null_other_keys_p@{h:g}"] = [
                    detect_open(WatermarkScheme(f"null-{k}", args.gamma, args.context), student, stok, reference,
                                min_entropy=h, examples=0).p_value for k in range(args.null_keys)]
                # and the clean student reading the watermarked traces it never trained on, with the real key
                row[f"null_reading_watermarked_traces@{h:g}"] = detect_open(
                    scheme, student, stok, [(r["prompt"], r["completion"]) for r in marked_all], min_entropy=h,
                    examples=0).as_dict()
        res["students"].append(row)
        console.print(f"fraction {frac:g}: student accuracy {ev.accuracy:.3f}; reference texts p "
                      f"{row['open_reference']['p_value']:.3g} (log10 {row['open_reference']['log10_p']:.1f}, "
                      f"{row['open_reference']['scored']} pairs)"
                      + (f"; served traces p {row['open_served']['p_value']:.3g} (log10 "
                         f"{row['open_served']['log10_p']:.1f}, {row['open_served']['scored']} pairs)"
                         if served else "") + f" [{train_s:.0f}s]")
        atomic_write_json(out / "results.json", res)
    res["seconds"] = time.perf_counter() - t_start
    res["machine"]["loadavg_end"] = os.getloadavg()
    atomic_write_json(out / "results.json", res)
    console.print(f"results in {out / 'results.json'} ({res['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
