"""Speed at real scale: SmolLM2-135M-Instruct -> its 8-of-30-layer copy (vocab 49,152), ours against TRL's
GKDTrainer and DistillationTrainer on the same pair, data and batch, side by side in one run.

    make install-real && distillarena convert-smollm2 --dtype bfloat16
    python -m distillarena.recipes.real data          # the chat data (the teacher's answers to held-out prompts)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_realscale.py [--quick] [--repeats 2]

Configurations: {ours, TRL GKDTrainer} x {off-policy, on-policy} and TRL DistillationTrainer on-policy (it has no
off-policy mode in TRL 1.16: it always generates), each in float32 and bfloat16. Every trainer runs the generalized
JSD with beta = 0.5 at loss temperature 1, AdamW, batch ``--batch-size`` sequences of the same chat data (the
teacher's answers, cut to ``--max-completion`` tokens); on-policy samples ``--max-new-tokens`` at temperature 1
from the student (all three trainers). bfloat16 is mixed precision in every trainer: float32 master weights, the
forward and the loss under bfloat16 autocast (ours: ``student.dtype: bfloat16``; TRL: ``bf16=True``); the teacher's
weights are in the row's dtype. Gradient checkpointing is off everywhere (DistillationTrainer's default is on).

Each configuration runs in its own process (its peak RSS is its own: ``ru_maxrss``), ``--warmup`` steps then
``--steps`` timed ones; the configurations are interleaved (``--repeats`` rounds of all of them), so a change of
the machine's load hits every trainer alike. Throughput: valid target (completion) tokens per second of training
step (generation included on-policy). Load average and threads are recorded beside every configuration. Writes
``bench/results/realscale.json`` (``realscale-quick.json`` with ``--quick``). Not in ``run_all.py``'s default
list: it needs the ``real`` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

BETA = 0.5
IMPLS = {"ours": ("off", "on"), "trl_gkd": ("off", "on"), "trl_distillation": ("on",)}


# ------------------------------------------------------------------------------------------------------------------
# One configuration (a child process)
# ------------------------------------------------------------------------------------------------------------------


def load_pair(teacher_path: str, dtype: str, keep_every: int):
    import torch

    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.train.student import copy_with_layers_dropped

    tok = load_tokenizer(teacher_path)
    wdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    teacher = load_model(teacher_path, dtype=wdtype).eval()
    # the student is the float32 layer-dropped copy in every trainer (bf16 rows: float32 master weights)
    student = copy_with_layers_dropped(teacher, keep_every)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return tok, teacher, student


def chat_rows(tok, data: str, n: int, max_completion: int) -> list[dict]:
    """``n`` conversations (user, assistant) with the assistant turn cut to ``max_completion`` tokens (at the text
    level, so every trainer tokenizes the same text with the chat template)."""
    from distillarena.tasks.data import load_examples

    rows = []
    for e in load_examples(data, limit=n):
        assert e.messages is not None
        user, answer = e.messages[0]["content"], e.messages[-1]["content"]
        ids = tok(answer, add_special_tokens=False)["input_ids"][:max_completion]
        rows.append([{"role": "user", "content": user},
                     {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}])
    if not rows:
        raise SystemExit(f"no conversations in {data}")
    return rows


def step_times(marks: list[float], counted: list[int], warmup: int) -> dict:
    """marks: the start, then the end of every step; counted: the target tokens of every step."""
    times = [b - a for a, b in zip(marks[warmup:], marks[warmup + 1:], strict=False)]
    toks = counted[warmup:warmup + len(times)]
    return {"step_s": times, "tokens": toks, "tokens_per_s": sum(toks) / sum(times),
            "step_ms_median": 1000 * statistics.median(times), "tokens_per_step": sum(toks) / len(times)}


def run_ours(cfg: dict, tok, teacher, student, rows) -> dict:
    from distillarena.tasks.data import Example, encode_example
    from distillarena.teachers import LocalTeacher
    from distillarena.train.distill import DistillLoss, DistillStream, Encoded, OnPolicy, Stage
    from distillarena.train.loop import LoopConfig, train
    from distillarena.train.student import UnderPrecision

    pool = [Encoded(*encode_example(tok, Example(messages=m))) for m in rows]
    total = cfg["warmup"] + cfg["steps"]
    lmbda = 1.0 if cfg["regime"] == "on" else 0.0
    stage = Stage(1, total, "jsd", {"beta": BETA}, lmbda=lmbda)
    stream = DistillStream({"data": pool}, [stage], batch_size=cfg["batch_size"], grad_accum=1, seed=0,
                           pad_id=tok.pad_token_id)
    loss = DistillLoss(LocalTeacher(teacher, tok), [stage], unwrap=lambda m: m, seed=0)
    prep = OnPolicy(lambda m: m, max_new_tokens=cfg["max_new_tokens"], temperature=1.0, seed=0,
                    pad_id=tok.pad_token_id, eos_id=tok.eos_token_id) if lmbda else None
    dtype = cfg["dtype"]
    marks: list[float] = []
    counted: list[int] = []
    last = [0]

    def on_log(s):
        marks.append(time.perf_counter())
        counted.append(s.tokens - last[0])
        last[0] = s.tokens

    marks.append(time.perf_counter())
    train(student, stream, UnderPrecision(loss, dtype, "cpu"),
          LoopConfig(steps=total, lr=1e-5, warmup_steps=1, log_every=1),
          on_log=on_log, prepare=UnderPrecision(prep, dtype, "cpu") if prep else None)
    return step_times(marks, counted, cfg["warmup"])


def _trl_common(cfg: dict, out_dir: str) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=cfg["batch_size"],
                max_steps=cfg["warmup"] + cfg["steps"], learning_rate=1e-5, beta=BETA, temperature=1.0,
                logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
                seed=0, bf16=cfg["dtype"] == "bfloat16", disable_tqdm=True, gradient_checkpointing=False)


def run_trl_gkd(cfg: dict, tok, teacher, student, rows, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    marks: list[float] = []
    counted: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counted.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GKDConfig(**_trl_common(cfg, out_dir), lmbda=1.0 if cfg["regime"] == "on" else 0.0,
                     max_new_tokens=cfg["max_new_tokens"], max_length=1024)
    trainer = Counting(model=student, teacher_model=teacher, args=args,
                       train_dataset=Dataset.from_list([{"messages": m} for m in rows]), processing_class=tok,
                       callbacks=[Timer()])
    marks.append(time.perf_counter())
    trainer.train()
    return step_times(marks, counted, cfg["warmup"])


def run_trl_distillation(cfg: dict, tok, teacher, student, rows, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    marks: list[float] = []
    counted: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class Counting(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counted.append(int(inputs["completion_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = DistillationConfig(**_trl_common(cfg, out_dir), max_completion_length=cfg["max_new_tokens"])
    trainer = Counting(model=student, teacher_model=teacher, args=args,
                       train_dataset=Dataset.from_list([{"prompt": m[:1]} for m in rows]), processing_class=tok,
                       callbacks=[Timer()])
    marks.append(time.perf_counter())
    trainer.train()
    return step_times(marks, counted, cfg["warmup"])


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok, teacher, student = load_pair(cfg["teacher"], cfg["dtype"], cfg["keep_every"])
    rows = chat_rows(tok, cfg["data"], cfg["pool"], cfg["max_completion"])
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        if cfg["impl"] == "ours":
            res = run_ours(cfg, tok, teacher, student, rows)
        elif cfg["impl"] == "trl_gkd":
            res = run_trl_gkd(cfg, tok, teacher, student, rows, d)
        else:
            res = run_trl_distillation(cfg, tok, teacher, student, rows, d)
    return {**res, "load_s": load_s, "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------------
# The parent: interleaved rounds, one process per configuration
# ------------------------------------------------------------------------------------------------------------------


def spawn(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"]),
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    # communicate() reaped the child; its resource usage is in RUSAGE_CHILDREN only as a running maximum, so the
    # child reports its own peak instead (ru_maxrss of RUSAGE_SELF, in KiB on Linux)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (err or "")[-3000:], "returncode": proc.returncode, "wall_s": wall}
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res.update(wall_s=wall, load_before=load_before, load_after=os.getloadavg())
    return res


def bootstrap_ratio(num: list[float], den: list[float], replicates: int = 4000, seed: int = 0) -> dict:
    """Ratio of the mean per-step throughputs, with a 95% percentile bootstrap interval (steps resampled within
    each configuration, independently: the steps of two trainers are not paired)."""
    import numpy as np

    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, len(a), (replicates, len(a)))].mean(1)
    rb = b[rng.integers(0, len(b), (replicates, len(b)))].mean(1)
    lo, hi = np.quantile(ra / rb, [0.025, 0.975])
    return {"mean": float(a.mean() / b.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n_steps": [len(a), len(b)]}


def summarize(runs: list[dict]) -> list[dict]:
    """Per (dtype, regime): each trainer's pooled per-step throughput and peak RSS, and ours / each TRL trainer."""
    rows = []
    keys = sorted({(r["cfg"]["dtype"], r["cfg"]["regime"]) for r in runs})
    for dtype, regime in keys:
        by_impl: dict[str, dict] = {}
        for impl in IMPLS:
            rs = [r for r in runs if r["cfg"]["impl"] == impl and r["cfg"]["dtype"] == dtype
                  and r["cfg"]["regime"] == regime and "error" not in r["result"]]
            if not rs:
                continue
            per_step = [t / s for r in rs for t, s in zip(r["result"]["tokens"], r["result"]["step_s"], strict=True)]
            by_impl[impl] = {
                "tokens_per_s": sum(sum(r["result"]["tokens"]) for r in rs) / sum(sum(r["result"]["step_s"])
                                                                                  for r in rs),
                "per_step_tokens_per_s": per_step,
                "per_round_tokens_per_s": [r["result"]["tokens_per_s"] for r in rs],
                "peak_rss_gb": max(r["result"]["peak_rss_gb"] for r in rs),
                "tokens_per_step": statistics.mean(r["result"]["tokens_per_step"] for r in rs),
            }
        row: dict = {"dtype": dtype, "regime": regime, "trainers": by_impl}
        if "ours" in by_impl:
            for impl in ("trl_gkd", "trl_distillation"):
                if impl in by_impl:
                    o, t = by_impl["ours"], by_impl[impl]
                    row[f"speedup_vs_{impl}"] = bootstrap_ratio(o["per_step_tokens_per_s"],
                                                                t["per_step_tokens_per_s"])
                    row[f"speedup_vs_{impl}"]["pooled"] = o["tokens_per_s"] / t["tokens_per_s"]
                    row[f"memory_vs_{impl}"] = o["peak_rss_gb"] / t["peak_rss_gb"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="one round, 2 timed steps, float32 only")
    ap.add_argument("--teacher", default=None, help="default: the converted SmolLM2-135M-Instruct (bfloat16)")
    ap.add_argument("--data", default=None, help="chat JSON lines (default: <cache>/data/chat/instruct-heldout.jsonl)")
    ap.add_argument("--keep-every", type=int, default=4, help="the student keeps layers 0, k, 2k, ...")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pool", type=int, default=32, help="conversations in the data pool")
    ap.add_argument("--max-completion", type=int, default=64, help="off-policy answers cut to this many tokens")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="on-policy samples")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds over all configurations")
    ap.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--regimes", default="off,on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        import resource

        res = run_one(json.loads(args.one))
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(res), flush=True)
        return

    from distillarena.core.io import cache_dir
    from distillarena.models.real import smollm2_dir

    teacher = args.teacher or str(smollm2_dir("bfloat16"))
    data = args.data or str(cache_dir() / "data" / "chat" / "instruct-heldout.jsonl")
    for p, hint in ((teacher, "distillarena convert-smollm2 --dtype bfloat16"),
                    (data, "python -m distillarena.recipes.real data")):
        if not Path(p).exists():
            raise SystemExit(f"{p} is missing: run `{hint}` first")
    steps = args.steps or (2 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 2)
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    impls = args.impls.split(",")
    regimes = args.regimes.split(",")
    configs = [dict(impl=i, regime=r, dtype=d) for d in dtypes for r in regimes for i in impls if r in IMPLS[i]]
    common = dict(teacher=teacher, data=data, keep_every=args.keep_every, batch_size=args.batch_size,
                  pool=args.pool, max_completion=args.max_completion, max_new_tokens=args.max_new_tokens,
                  steps=steps, warmup=args.warmup, threads=args.threads)
    runs: list[dict] = []
    t_all = time.perf_counter()
    out = args.out or HERE / "results" / f"realscale{'-quick' if args.quick else ''}.json"
    for rnd in range(repeats):
        # alternate the order every round, so neither trainer always runs first after a change of load
        order = configs if rnd % 2 == 0 else configs[::-1]
        for c in order:
            cfg = {**common, **c}
            print(f"round {rnd + 1}/{repeats}: {c['impl']:<17} {c['regime']:>3}-policy {c['dtype']:<8} ...",
                  end=" ", flush=True)
            res = spawn(cfg)
            runs.append({"round": rnd, "cfg": cfg, "result": res})
            if "error" in res:
                print(f"FAILED\n{res['error']}", flush=True)
            else:
                print(f"{res['tokens_per_s']:7.1f} tok/s  {res['step_ms_median']:7.0f} ms/step  peak RSS "
                      f"{res['peak_rss_gb']:.2f} GB  load {res['load_before'][0]:.2f}", flush=True)
            # written after every configuration: an interrupted run keeps what it measured
            summary = write_results(out, args, common, runs, t_all, steps, repeats, complete=False)
    summary = write_results(out, args, common, runs, t_all, steps, repeats, complete=True)
    print()
    for row in summary:
        tr = row["trainers"]
        line = f"{row['dtype']:<8} {row['regime']:>3}-policy: " + "  ".join(
            f"{k} {v['tokens_per_s']:.1f} tok/s {v['peak_rss_gb']:.2f} GB" for k, v in tr.items())
        for impl in ("trl_gkd", "trl_distillation"):
            if f"speedup_vs_{impl}" in row:
                s = row[f"speedup_vs_{impl}"]
                line += (f"\n    ours / {impl}: {s['mean']:.2f}x [{s['ci_low']:.2f}, {s['ci_high']:.2f}] "
                         f"(steps {s['n_steps']}), memory {row[f'memory_vs_{impl}']:.2f}x")
        print(line)
    print(f"written {out}")


def write_results(out: Path, args, common: dict, runs: list[dict], t_all: float, steps: int, repeats: int, *,
                  complete: bool) -> list[dict]:
    import torch
    import trl

    summary = summarize(runs)
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "trl": trl.__version__, "threads": args.threads, "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_end": os.getloadavg(),
            "wall_s": time.perf_counter() - t_all, "quick": args.quick, "steps": steps, "warmup": args.warmup,
            "repeats": repeats, "beta": BETA, "complete": complete, "configurations_run": len(runs),
            "note": "TRL DistillationTrainer (1.16) is on-policy only: it always generates the completions"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "setup": common, "summary": summary, "runs": runs}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
