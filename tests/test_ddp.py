"""Scale-out: the same ``distillarena distill`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) ends with the
weights of one process with the same global batch, also when the ranks hold uneven valid-token counts."""

import json
import subprocess
import sys

import pytest
import torch
from test_distill_support import ROOT, subprocess_env, tiny_config, weights_of, write_config

from distillarena.cli import main
from distillarena.core.config import load_config
from distillarena.models.presets import load_tokenizer
from distillarena.train.config import DistillConfig
from distillarena.train.distill import DistillStream
from distillarena.train.loop import count_targets
from distillarena.train.setup import build_data, resolve_stages


def torchrun(cfg, out, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distillarena.cli", "distill", str(cfg), "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def compare(one, two, atol=1e-6):
    a, b = weights_of(one), weights_of(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def rank_counts(cfg_path, teacher):
    """Valid target tokens per (step, rank) as the two processes see them."""
    cfg = load_config(cfg_path, DistillConfig)
    tok = load_tokenizer(str(teacher))
    data = build_data(cfg, tok, 512)
    out = []
    for rank in (0, 1):
        s = DistillStream({"data": data.train}, resolve_stages(cfg), batch_size=cfg.train.batch_size,
                          grad_accum=cfg.train.grad_accum, world=2, rank=rank, seed=cfg.train.seed,
                          pad_id=tok.pad_token_id)
        per = cfg.train.grad_accum // 2
        out.append([sum(count_targets(next(s)) for _ in range(per)) for _ in range(cfg.train.steps)])
    return out


def test_two_processes_match_one_process(tiny_teacher, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tiny_teacher, objective="fkl", train={"steps": 3, "batch_size": 3, "grad_accum": 2},
        eval={"n_examples": 4, "n_problems": 0}, checkpoint={"every": 2}))
    r0, r1 = rank_counts(cfg, tiny_teacher)
    assert sum(a != b for a, b in zip(r0, r1, strict=True)) >= 2, (r0, r1)  # the ranks hold uneven counts
    assert main(["distill", str(cfg), "--out", str(tmp_path / "one")]) == 0
    r = torchrun(cfg, tmp_path / "two")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    compare(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "checkpoints" / "step-00000003").is_dir()


@pytest.mark.slow
def test_two_processes_match_one_process_hpd_and_on_policy(tiny_teacher, tmp_path):
    """HPD's per-position samples and on-policy samples are keyed by the global micro-batch: the same draws
    whatever the number of processes."""
    cfg = tiny_config(tiny_teacher, stages=[{"steps": 2, "objective": "hpd"},
                                            {"steps": 2, "objective": "jsd", "lmbda": 0.5}],
                      train={"batch_size": 3, "grad_accum": 4}, eval={"n_examples": 4, "n_problems": 0})
    del cfg["train"]["steps"]
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["distill", str(path), "--out", str(tmp_path / "one")]) == 0
    r = torchrun(path, tmp_path / "two")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    compare(tmp_path / "one", tmp_path / "two", atol=1e-5)
