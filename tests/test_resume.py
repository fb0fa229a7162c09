"""Exact resume: a run killed at any moment (including half way through writing a checkpoint) and resumed ends
with bit-identical weights to an uninterrupted run with the same seed (CPU)."""

import copy
import itertools
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from test_distill_support import ROOT, run_cli, subprocess_env, tiny_config, weights_of, write_config

from distillarena.cli import main
from distillarena.core.io import read_jsonl
from distillarena.models.presets import build_preset
from distillarena.tasks.data import arithmetic_examples, collate, encode_example
from distillarena.train.checkpoint import latest_checkpoint, list_checkpoints
from distillarena.train.loop import LoopConfig, causal_lm_loss_sum, train


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loop_resume_is_exact_with_a_plain_iterator(task_tok, tmp_path):
    """The generic loop (teacher training uses it): an interrupted run resumed from its checkpoint, with the data
    position restored by replaying a plain iterator, ends where the uninterrupted run ends."""
    exs = arithmetic_examples("train", 48, [1, 2, 3], seed=0)
    batches = [collate([encode_example(task_tok, e) for e in exs[i:i + 4]], task_tok.pad_token_id)
               for i in range(0, 48, 4)]
    base = build_preset("tiny", task_tok, seed=0)
    cfg = LoopConfig(steps=6, lr=1e-2, warmup_steps=2, grad_accum=2, log_every=1, checkpoint_every=2)
    full = train(copy.deepcopy(base), itertools.cycle(batches), causal_lm_loss_sum, cfg,
                 checkpoint_dir=tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_at_5(log):
        if log.step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(copy.deepcopy(base), itertools.cycle(batches), causal_lm_loss_sum, cfg, on_log=crash_at_5,
              checkpoint_dir=tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    resumed = train(copy.deepcopy(base), itertools.cycle(batches), causal_lm_loss_sum, cfg,
                    checkpoint_dir=tmp_path / "b", resume=True)
    assert_same_weights(full.state_dict(), resumed.state_dict())
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4, 6]  # only the newest two are kept


def resume_config(teacher):
    """Two stages (HPD, then a lambda-mix with on-policy sampling), so every random draw has to be replayed."""
    cfg = tiny_config(teacher, stages=[{"steps": 4, "objective": "hpd"},
                                       {"steps": 4, "objective": "jsd", "lmbda": 0.5}],
                      train={"grad_accum": 2}, eval={"n_examples": 4, "n_problems": 0},
                      checkpoint={"every": 2, "keep": 2})
    del cfg["train"]["steps"]
    return cfg


def test_sigkill_mid_run_and_mid_checkpoint_then_resume_is_bit_identical(tiny_teacher, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", resume_config(tiny_teacher))
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["distill", str(cfg), "--out", str(full)]) == 0

    # 1. killed right after optimizer step 3: the latest checkpoint is step 2
    r = run_cli(["distill", str(cfg), "--out", str(cut)], DISTILLARENA_TEST_CRASH="step:3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000002"
    # 2. resumed, then killed half way through writing the checkpoint of step 6
    r = run_cli(["distill", str(cfg), "--out", str(cut), "--resume"], DISTILLARENA_TEST_CRASH="checkpoint:6")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names[0].startswith(".step-00000006.tmp-") and names[1:] == ["step-00000002", "step-00000004"]
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000004"  # never the half-written one
    # 3. resumed to the end
    assert main(["distill", str(cfg), "--out", str(cut), "--resume"]) == 0
    assert not any(p.name.startswith(".") for p in (cut / "checkpoints").iterdir())
    assert_same_weights(weights_of(full), weights_of(cut))
    recs = read_jsonl(cut / "metrics.jsonl")
    assert [r["step"] for r in recs if r["phase"] == "resume"] == [2, 4]
    assert max(r["step"] for r in recs if r["phase"] == "train") == 8


def test_resume_refuses_another_config(tiny_teacher, tmp_path, capsys):
    cfg = resume_config(tiny_teacher)
    cfg["checkpoint"]["every"] = 4
    path = write_config(tmp_path / "c.yaml", cfg)
    out = tmp_path / "run"
    assert main(["distill", str(path), "--out", str(out)]) == 0
    cfg["train"]["lr"] = 0.5
    assert main(["distill", str(write_config(tmp_path / "d.yaml", cfg)), "--out", str(out), "--resume"]) == 2
    assert "differs from this config" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_teacher, tmp_path):
    cfg = resume_config(tiny_teacher)
    cfg["stages"] = [{"steps": 10, "objective": "hpd"}, {"steps": 10, "objective": "jsd", "lmbda": 0.5}]
    cfg["checkpoint"]["every"] = 1
    path = write_config(tmp_path / "c.yaml", cfg)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["distill", str(path), "--out", str(full)]) == 0
    rng = random.Random(0)
    kills = 0
    for _attempt in range(40):
        args = [sys.executable, "-m", "distillarena.cli", "distill", str(path), "--out", str(cut)]
        if cut.exists():
            args.append("--resume")
        p = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=rng.uniform(3.0, 7.0))
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            continue
        assert p.returncode == 0
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 1
    assert_same_weights(weights_of(full), weights_of(cut))
