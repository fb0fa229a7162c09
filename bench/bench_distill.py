"""Distillation step cost, the top-k cache's size and quality, a short HPD run, and TRL's GKDTrainer side by side.

On the built-in world (Llama-architecture presets, the built-in tokenizer, vocab 316), CPU, in one run:

1. **Step cost** through the project's loop (teacher forward + student forward/backward + AdamW), same teacher,
   student, batches: forward KL vs HPD with a live teacher, and both with the top-k cache (k = 128) instead.
   Target: HPD <= 1.1x forward KL.
2. **Top-k cache**: bytes per target token and the mean KL(teacher || cached) at several k and 8 / 16 bits.
3. **A short HPD run**: held-out forward KL (exact, teacher-forced) before and after.
4. **TRL** (``pip install -r requirements/bench.txt``): ``trl.experimental.gkd.GKDTrainer`` against ours, generalized
   JSD with beta = 0.5, off-policy (lambda = 0) and on-policy (lambda = 1), same teacher, student, batch size,
   max_new_tokens and sampling temperature; throughput in valid target tokens per second of training step.

    python bench/bench_distill.py            # the full run (several minutes on 2 cores; trains a teacher once)
    python bench/bench_distill.py --quick    # a smoke run

The teacher is the built-in one for ``--teacher-preset`` trained for ``--teacher-steps`` (cached, like
``distillarena teach``), or ``--teacher PATH``. Prints tables and writes JSON under ``bench/results/``. Wall-clock
numbers depend on the machine's load (recorded in the JSON); each timed configuration runs ``--repeats`` times and
the fastest median step is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from distillarena.models.fingerprint import model_fingerprint  # noqa: E402
from distillarena.models.presets import build_preset, load_model, load_tokenizer  # noqa: E402
from distillarena.objectives import get_objective  # noqa: E402
from distillarena.recipes.distill import run_distill  # noqa: E402
from distillarena.teachers import LocalTeacher, TopKCache, build_topk_cache  # noqa: E402
from distillarena.train.config import DistillConfig, TeacherConfig  # noqa: E402
from distillarena.train.distill import DistillLoss, DistillStream, OnPolicy, Stage  # noqa: E402
from distillarena.train.loop import LoopConfig, train  # noqa: E402
from distillarena.train.setup import build_data  # noqa: E402
from distillarena.train.teacher import teach  # noqa: E402

console = Console()


def time_our_steps(teacher_access, tok, pool, *, objective: str, params: dict, steps: int, warmup: int,
                   batch_size: int, student_preset: str, lmbda: float = 0.0, max_new_tokens: int = 32,
                   temperature: float = 0.9) -> dict:
    """Median wall time of one optimizer step of our loop, and valid target tokens per second."""
    stage = Stage(1, steps + warmup, objective, params, lmbda=lmbda)
    stream = DistillStream({"data": pool}, [stage], batch_size=batch_size, grad_accum=1, seed=0,
                           pad_id=tok.pad_token_id)
    student = build_preset(student_preset, tok, seed=0)
    loss = DistillLoss(teacher_access, [stage], unwrap=lambda m: m, seed=0)
    prep = OnPolicy(lambda m: m, max_new_tokens=max_new_tokens, temperature=temperature, seed=0,
                    pad_id=tok.pad_token_id, eos_id=tok.eos_token_id) if lmbda > 0 else None
    marks: list[tuple[float, int]] = []

    def on_log(s):
        marks.append((time.perf_counter(), s.tokens))

    t0 = time.perf_counter()
    train(student, stream, loss, LoopConfig(steps=steps + warmup, lr=1e-3, warmup_steps=1, log_every=1),
          on_log=on_log, prepare=prep)
    times = [b[0] - a[0] for a, b in zip(marks[warmup - 1:], marks[warmup:], strict=False)]
    if warmup == 0:
        times = [marks[0][0] - t0] + times
    toks = marks[-1][1] - marks[warmup - 1][1] if warmup else marks[-1][1]
    med = statistics.median(times)
    return {"step_ms": 1000 * med, "tokens_per_s": toks / sum(times), "steps_timed": len(times),
            "tokens_per_step": toks / len(times)}


def best_of(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r["step_ms"])


# ------------------------------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------------------------------


def time_trl(teacher_path: str, tok, pool, *, lmbda: float, steps: int, warmup: int, batch_size: int,
             student_preset: str, max_new_tokens: int, temperature: float, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = []
    for e in pool:
        prompt = tok.decode(e.ids[:e.prompt_len], skip_special_tokens=True)
        completion = tok.decode([t for t in e.ids[e.prompt_len:] if t != tok.eos_token_id],
                                skip_special_tokens=True)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    ds = Dataset.from_list(rows)
    teacher = load_model(teacher_path)
    student = build_preset(student_preset, tok, seed=0)
    marks: list[float] = []
    counted: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counted.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps + warmup,
                     learning_rate=1e-3, lmbda=lmbda, beta=0.5, temperature=temperature,
                     max_new_tokens=max_new_tokens, logging_steps=10_000, save_strategy="no", report_to="none",
                     use_cpu=True, dataloader_num_workers=0, seed=0, max_length=256, bf16=False,
                     disable_tqdm=True, gradient_checkpointing=False)
    trainer = Counting(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                       callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
    marks.insert(0, start)
    times = [b - a for a, b in zip(marks[warmup:], marks[warmup + 1:], strict=False)]
    toks = sum(counted[warmup:])
    return {"step_ms": 1000 * statistics.median(times), "tokens_per_s": toks / sum(times),
            "steps_timed": len(times), "tokens_per_step": toks / max(len(times), 1)}


# ------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher", type=str, default=None, help="a teacher folder (default: train the built-in one)")
    ap.add_argument("--teacher-preset", default="small")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--hpd-steps", type=int, default=None, help="steps of the short HPD run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for tiny models on 2 cores)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--only-trl", action="store_true", help="only section 4 (ours vs TRL), e.g. for the toy target")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 2)
    warmup = 2
    hpd_steps = args.hpd_steps or (20 if args.quick else 150)
    results: dict = {}

    # --- the teacher
    if args.teacher:
        teacher_path = args.teacher
    else:
        tsteps = 60 if args.quick else args.teacher_steps
        tcfg = TeacherConfig.model_validate({"preset": args.teacher_preset,
                                             "train": {"steps": tsteps, "batch_size": 32, "eval_every": 0}})
        teacher_path = str(teach(tcfg, console=console).path)
    tok = load_tokenizer(teacher_path)
    teacher = LocalTeacher(load_model(teacher_path), tok)
    cfg = DistillConfig.model_validate({"teacher": {"path": teacher_path},
                                        "data": {"train_size": 128 if args.quick else 512}})
    data = build_data(cfg, tok, 512)
    pool = data.train
    results["setup"] = {"teacher": teacher_path, "teacher_preset": args.teacher_preset,
                        "student_preset": args.student_preset, "batch_size": args.batch_size,
                        "pool": len(pool), "vocab": teacher.vocab_size}

    # --- 2. the top-k cache (built first: the step-cost comparison reads it)
    tmp = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    cache_rows: list[dict] = []
    step_rows: list[dict] = []
    for k in [] if args.only_trl else ([32, 128] if args.quick else [8, 32, 64, 128, teacher.vocab_size]):
        for bits in ([8] if args.quick else [8, 16]):
            t0 = time.perf_counter()
            st = build_topk_cache(tmp / f"c{k}-{bits}", teacher, [(e.ids, e.labels) for e in pool], k=k, bits=bits,
                                  teacher_id=model_fingerprint(teacher.model))
            cache_rows.append({"k": k, "bits": bits, **st.as_dict(), "build_s": time.perf_counter() - t0})
    results["topk_cache"] = cache_rows
    common = dict(steps=steps, warmup=warmup, batch_size=args.batch_size, student_preset=args.student_preset)

    # --- 1. step cost
    timed = [] if args.only_trl else [("fkl, live teacher", teacher, "fkl"), ("hpd, live teacher", teacher, "hpd"),
                                      ("fkl, top-k cache", TopKCache(tmp / "c128-8"), "fkl"),
                                      ("hpd, top-k cache", TopKCache(tmp / "c128-8"), "hpd")]
    for label, access, obj in timed:
        console.print(f"timing {label} ...")
        r = best_of(lambda a=access, o=obj: time_our_steps(a, tok, pool, objective=o, params={}, **common), repeats)
        step_rows.append({"config": label, **r})
    for r in step_rows:
        r["vs_fkl_live"] = r["step_ms"] / step_rows[0]["step_ms"]
    results["step_cost"] = step_rows

    # --- 3. a short HPD run
    if not args.only_trl:
        with tempfile.TemporaryDirectory() as d:
            run_cfg = DistillConfig.model_validate({
                "teacher": {"path": teacher_path}, "student": {"preset": args.student_preset},
                "data": {"train_size": 128 if args.quick else 512}, "objective": "hpd",
                "train": {"steps": hpd_steps, "batch_size": args.batch_size, "eval_every": 0, "log_every": 10},
                "eval": {"n_examples": 64, "n_problems": 0}, "checkpoint": {"every": 0}})
            res = run_distill(run_cfg, Path(d) / "run", console=Console(quiet=True))
            results["hpd_run"] = {"steps": hpd_steps,
                                  "heldout_fkl_before": res.summary["eval_initial"]["heldout_fkl"],
                                  "heldout_fkl_after": res.summary["eval_final"]["heldout_fkl"],
                                  "student_entropy_after": res.summary["eval_final"]["student_entropy"],
                                  "teacher_entropy": res.summary["eval_final"]["teacher_entropy"]}

    # --- 4. TRL
    trl_rows = []
    if not args.no_trl:
        try:
            import trl

            trl_version = trl.__version__
        except ImportError:
            trl_version = None
            console.print("[yellow]trl not installed: pip install -r requirements/bench.txt[/]")
        if trl_version:
            gen = dict(max_new_tokens=32, temperature=0.9)
            for lmbda in (0.0, 1.0):
                console.print(f"timing ours vs TRL GKDTrainer, jsd beta=0.5, lambda={lmbda:g} ...")
                # interleaved rounds (ours, then TRL, then ours ...): a change of the machine's load hits both
                rounds = []
                for _ in range(repeats):
                    load = os.getloadavg()[0]
                    o = time_our_steps(teacher, tok, pool, objective="jsd", params={"beta": 0.5}, lmbda=lmbda,
                                       **common, **gen)
                    with tempfile.TemporaryDirectory() as d:
                        t = time_trl(teacher_path, tok, pool, lmbda=lmbda, steps=steps, warmup=warmup,
                                     batch_size=args.batch_size, student_preset=args.student_preset, out_dir=d,
                                     **gen)
                    rounds.append({"ours": o, "trl": t, "ratio": o["tokens_per_s"] / t["tokens_per_s"],
                                   "load_before": load, "load_after": os.getloadavg()[0]})
                ours = min((r["ours"] for r in rounds), key=lambda r: r["step_ms"])
                theirs = min((r["trl"] for r in rounds), key=lambda r: r["step_ms"])
                ratios = [r["ratio"] for r in rounds]
                trl_rows.append({"lmbda": lmbda, "ours": ours, "trl": theirs,
                                 "speedup_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                                 "round_ratios": ratios, "round_ratio_median": statistics.median(ratios),
                                 "rounds": rounds})
            results["trl"] = {"version": trl_version, "rows": trl_rows}

    # --- report
    console.rule("step cost (our loop; median ms per optimizer step)")
    for r in step_rows:
        console.print(f"  {r['config']:<22} {r['step_ms']:8.1f} ms  {r['tokens_per_s']:9,.0f} tok/s  "
                      f"{r['vs_fkl_live']:.2f}x fkl-live")
    console.rule(f"top-k cache (built-in teacher, vocab {teacher.vocab_size})")
    for r in cache_rows:
        console.print(f"  k={r['k']:<4} {r['bits']:>2}-bit  {r['signal_bytes_per_token']:5.0f} B/token "
                      f"({r['file_bytes_per_token']:5.0f} with ids)  KL mean {r['kl_mean']:.2e}  max {r['kl_max']:.2e}"
                      f"  tail {r['tail_mass_mean']:.2e}")
    h = results.get("hpd_run")
    if h:
        console.rule(f"short HPD run ({h['steps']} steps)")
        console.print(f"  held-out forward KL {h['heldout_fkl_before']:.4f} -> {h['heldout_fkl_after']:.4f}; "
                      f"student entropy {h['student_entropy_after']:.3f} (teacher {h['teacher_entropy']:.3f})")
    if trl_rows:
        console.rule(f"ours vs TRL {results['trl']['version']} GKDTrainer (jsd beta=0.5; tokens/s)")
        for r in trl_rows:
            console.print(f"  lambda={r['lmbda']:g}: ours {r['ours']['tokens_per_s']:9,.0f}  "
                          f"TRL {r['trl']['tokens_per_s']:9,.0f}  ratio {r['speedup_tokens_per_s']:.2f}x "
                          f"(per round {', '.join(f'{x:.2f}' for x in r['round_ratios'])})  "
                          f"(ms/step {r['ours']['step_ms']:.0f} vs {r['trl']['step_ms']:.0f})")

    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "quick": args.quick, "steps": steps, "repeats": repeats,
            "hpd_objective_signals": sorted(get_objective("hpd").signals)}
    name = "distill" + ("-trl" if args.only_trl else "") + ("-quick" if args.quick else "")
    out = args.out or HERE / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **results}, indent=1))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
