"""A real model on this machine: SmolLM2-135M-Instruct distilled into its 8-of-30-layer copy by sequence KD (SFT on
the teacher's greedy completions) and by HPD (the teacher scoring online), side by side in one run.

    make install-real
    .venv/bin/distillarena convert-smollm2 --dtype bfloat16 && .venv/bin/distillarena chat-data
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_smollm2.py [--steps 16] [--threads 1]

Each recipe runs as its own ``distillarena distill`` process (the configs of ``examples/``, ``--steps`` overriding
the length), so its peak resident memory is its own. Reported per recipe: target tokens per second of training
(completion tokens; prompts are about as long again), peak RSS, the exact held-out forward KL(teacher || student)
before and after on the arithmetic held-out set and on the champ-dataset probe; then three held-out prompts answered
greedily by the teacher and both students. Not in ``run_all.py``: it needs the `real` extra. Writes
``bench/results/smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"sft (seq_kd)": "distill-smollm2-sft.yaml", "hpd": "distill-smollm2-hpd.yaml"}


def run_recipe(example: str, out: Path, steps: int, threads: int) -> dict:
    cfg = yaml.safe_load((ROOT / "examples" / example).read_text())
    cfg["train"]["steps"] = steps
    cfg_path = out.with_suffix(".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [str(Path(sys.executable).parent / "distillarena"), "distill", str(cfg_path), "--out", str(out),
           "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["phase"] == "train"]
    tokens, seconds = train[-1]["tokens"], train[-1]["elapsed_s"]  # both cumulative over the run
    before, after = summary["eval_initial"], summary["eval_final"]
    return {
        "config": str(cfg_path), "run": str(out), "steps": steps, "threads": threads, "wall_s": wall,
        "peak_rss_gb": usage.ru_maxrss / 2**20, "train_target_tokens": tokens, "train_s": seconds,
        "target_tokens_per_s": tokens / seconds,
        "heldout_fkl": [before["heldout_fkl"], after["heldout_fkl"]],
        "champ_fkl": [before.get("champ/heldout_fkl"), after.get("champ/heldout_fkl")],
        "eval_s": [before["eval_seconds"], after["eval_seconds"]],
        "seq_kd_cache": summary.get("seq_kd_cache"),
    }


def side_by_side(teacher: str, students: dict[str, Path], heldout: str, n: int = 3, max_new_tokens: int = 48):
    import torch

    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.tasks.data import load_examples
    from distillarena.train.distill import sample_completions

    tok = load_tokenizer(teacher)
    exs = load_examples(str(Path(heldout).expanduser()), limit=n)
    prompts = [tok.apply_chat_template(e.messages[:1], tokenize=False, add_generation_prompt=True) for e in exs]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    models = {"teacher": load_model(teacher, dtype=torch.bfloat16)}
    models.update({name: load_model(str(path / "student")) for name, path in students.items()})
    answers = {}
    for name, model in models.items():
        comps = sample_completions(model.eval(), ids, max_new_tokens=max_new_tokens, temperature=0.0,
                                   generator=None, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        answers[name] = [tok.decode(c, skip_special_tokens=True) for c in comps]
    return [{"question": e.messages[0]["content"], "reference": e.messages[1]["content"],
             **{name: answers[name][i] for name in models}} for i, e in enumerate(exs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-smollm2")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for name, example in RECIPES.items():
        print(f"== {name}: {example}, {args.steps} steps, {args.threads} thread(s)", flush=True)
        r = results[name] = run_recipe(example, args.runs / name.split()[0], args.steps, args.threads)
        print(f"   {r['target_tokens_per_s']:.1f} target tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB, "
              f"held-out forward KL {r['heldout_fkl'][0]:.3f} -> {r['heldout_fkl'][1]:.3f}, "
              f"champ {r['champ_fkl'][0]:.3f} -> {r['champ_fkl'][1]:.3f} (wall {r['wall_s']:.0f}s)", flush=True)
    cfg = yaml.safe_load((ROOT / "examples" / RECIPES["hpd"]).read_text())
    teacher = str(Path(cfg["teacher"]["path"]).expanduser())
    rows = side_by_side(teacher, {n: Path(r["run"]) for n, r in results.items()}, cfg["data"]["eval_source"])
    for row in rows:
        print(f"\n-- {row['question']}  (reference: {row['reference']!r})")
        for k, v in row.items():
            if k not in ("question", "reference"):
                print(f"   {k:>13}: {v!r}")
    out = ROOT / "bench" / "results" / "smollm2.json"
    out.write_text(json.dumps({"recipes": results, "answers": rows, "torch_threads": args.threads},
                              indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
