"""The game: recovery arithmetic, sweep caching and resume, bad input, the report and the CLI."""

import json
import math

import pytest
import torch
import yaml

from distillarena.core.config import load_config
from distillarena.core.errors import UserError
from distillarena.game import metrics
from distillarena.game.config import GameConfig
from distillarena.game.metrics import aggregate, gaps, recovery


def test_recovery_arithmetic():
    assert recovery(0.5, 0.2, 0.8) == (pytest.approx(0.5), None)
    assert recovery(0.8, 0.2, 0.8)[0] == pytest.approx(1.0)
    assert recovery(0.1, 0.2, 0.8)[0] == pytest.approx(-1 / 6)  # worse than the base student: negative
    assert recovery(0.9, 0.2, 0.8)[0] == pytest.approx(7 / 6)  # better than the undefended reference: above 1
    for ref in (0.2, 0.1):  # the undefended attacker gains nothing (or loses): undefined, never a crash
        r, note = recovery(0.5, 0.2, ref)
        assert math.isnan(r) and "gains nothing" in note


def test_aggregate_and_gap():
    rows = [
        {"defense_label": "poe(gamma=0.5)", "defense": "poe", "params": {"gamma": 0.5}, "attacker": a,
         "attacker_kind": a, "seed": s, "recovery": rec, "student_accuracy": acc, "teacher_accuracy": 0.9}
        for a, s, rec, acc in (("passive", 0, 0.4, 0.3), ("passive", 1, 0.6, 0.5),
                               ("adaptive", 0, 0.7, 0.6), ("adaptive", 1, float("nan"), 0.6))
    ]
    summ = {r["attacker"]: r for r in aggregate(rows)}
    assert summ["passive"]["recovery"] == pytest.approx(0.5)
    assert summ["passive"]["recovery_std"] == pytest.approx(math.sqrt(0.02))
    assert summ["adaptive"]["recovery"] == pytest.approx(0.7) and summ["adaptive"]["recovery_n"] == 1  # NaN skipped
    (g,) = gaps(list(summ.values()))
    assert g["recovery_gap"] == pytest.approx(0.2) and g["accuracy_gap"] == pytest.approx(0.2)
    assert math.isnan(metrics.mean_std([None, float("nan")])[0])


def test_bad_config(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({"budget": 300, "prompts": {"pool": 100}}))
    with pytest.raises(UserError, match="larger than the prompt pool"):
        load_config(p, GameConfig)
    p.write_text(yaml.safe_dump({"attackers": [{"kind": "adaptive", "beta": -0.5}]}))
    with pytest.raises(UserError, match="attackers.0.beta"):
        load_config(p, GameConfig)
    p.write_text(yaml.safe_dump({"attackers": [{"kind": "passive", "objective": "fkl"}]}))
    with pytest.raises(UserError, match="reveal.top_k"):
        load_config(p, GameConfig)
    p.write_text(yaml.safe_dump({"attackers": [{"kind": "passive"}, {"kind": "passive"}]}))
    with pytest.raises(UserError, match="appear twice"):
        load_config(p, GameConfig)


# --------------------------------------------------------------------------------------------------------------
# A whole (tiny) sweep
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(task_tok, tmp_path_factory):
    from distillarena.models.presets import build_preset

    root = tmp_path_factory.mktemp("game-models")
    paths = {}
    for name, preset, seed in (("teacher", "small", 0), ("other", "small", 3), ("student", "tiny", 1),
                               ("proxy", "tiny", 2)):
        build_preset(preset, task_tok, seed=seed).save_pretrained(root / name)
        task_tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def tiny_config(models, **over):
    data = {
        "teacher": {"path": models["teacher"]}, "student": {"path": models["student"]},
        "defenses": [{"kind": "poe", "strengths": [{"gamma": 0.5}], "proxy": {"path": models["proxy"]}}],
        "attackers": [{"kind": "passive"}, {"kind": "adaptive", "beta": 1.0}],
        "seeds": [0], "budget": 6, "prompts": {"pool": 12, "n_ops": [1, 2]}, "holdout": 6,
        "reveal": {"top_k": 3}, "max_new_tokens": 10, "batch_size": 4,
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        "eval": {"n_problems": 3, "difficulties": [1, 2], "max_new_tokens": 10, "entropy_problems": 2},
        "oracle": {"n_traces": 3, "lr": 0.05},
    }
    data.update(over)
    return GameConfig.model_validate(data)


def test_sweep_caches_cells_and_resumes_after_a_crash(models, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    from distillarena.game import attack, sweep

    cfg = tiny_config(models)
    cells = sweep.plan_cells(cfg)
    assert len(cells) == 4  # 2 undefended references (one per attacker and seed) + 2 defended cells

    whole = tmp_path / "whole"
    summary = sweep.run_game(cfg, whole)
    rows = [json.loads(x) for x in (whole / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and summary["cells"] == 4
    assert (whole / "results.csv").read_text().count("\n") == 5
    html = (whole / "report.html").read_text()
    assert "data:image/png;base64" in html and "Frontier" in html and "http" not in html.split("<body>")[1][:200]
    for r in rows:
        assert r["base_accuracy"] is not None and "recovery" in r
    refs = [r for r in rows if r["undefended_reference"]]
    assert {r["attacker"] for r in refs} == {"passive", "adaptive(beta=1)"}
    adaptive = [r for r in rows if r["attacker_kind"] == "adaptive" and not r["undefended_reference"]][0]
    assert "ess_fraction" in adaptive and adaptive["oracle_n"] == 3
    assert adaptive["proxy_forwards_per_token"] == 1 and adaptive["teacher_kl"] > 0
    values = json.loads((whole / "cells" / adaptive["key"] / "values.json").read_text())
    assert len(values["values"]) == 6 and sum(values["weights"]) == pytest.approx(6.0)
    # per-problem outcomes are stored, and every effect comes with its interval
    assert all(len(r["student_correct"]) == 3 and set(r["student_correct"]) <= {"0", "1"} for r in rows)
    assert set(summary["undefended_gain"]) == {"passive", "adaptive(beta=1)"}
    for gain in summary["undefended_gain"].values():
        assert set(gain) == {"mean", "ci_low", "ci_high", "n"} and gain["ci_low"] <= gain["mean"] <= gain["ci_high"]
    for s in summary["rows"]:
        assert s["gain"]["n"] == 3 and "unstable" in s["recovery_ci"]
    assert 0 <= summary["multimodality"]["multimodal_share"] <= 1

    # a rerun computes nothing
    calls = []
    real = attack.train_student
    monkeypatch.setattr(sweep, "train_student", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep.run_game(cfg, whole)
    assert calls == []

    # a sweep killed in its third cell: finished cells are kept, the rerun computes only what is missing
    crashed = tmp_path / "crashed"

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep, "train_student", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_game(cfg, crashed)
    assert len(list((crashed / "cells").iterdir())) == 2
    calls.clear()
    monkeypatch.setattr(sweep, "train_student", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep.run_game(cfg, crashed)
    assert len(calls) == 2
    again = [json.loads(x) for x in (crashed / "results.jsonl").read_text().splitlines()]
    keep = ("key", "student_accuracy", "teacher_accuracy", "teacher_kl", "recovery")
    assert [{k: r[k] for k in keep} for r in again] == [{k: r[k] for k in keep} for r in rows]

    # adding a seed reuses every finished cell
    calls.clear()
    sweep.run_game(tiny_config(models, seeds=[0, 1]), crashed)
    assert len(calls) == 4

    # the table is rebuilt from the run folder alone
    (crashed / "results.jsonl").unlink()
    sweep.rebuild(crashed, tiny_config(models, seeds=[0, 1]), report=False)
    assert len((crashed / "results.jsonl").read_text().splitlines()) == 8


def test_sweep_refuses_another_teacher_in_the_same_folder(models, tmp_path):
    from distillarena.game import sweep

    cfg = tiny_config(models)
    sweep.check_world(cfg, tmp_path)
    other = tiny_config(models, teacher={"path": models["other"]})
    with pytest.raises(UserError, match="agree on the task and the teacher"):
        sweep.run_game(other, tmp_path)


def test_fkl_attacker_and_answer_forcing(models, tmp_path):
    torch.set_num_threads(1)
    from distillarena.game import sweep

    cfg = tiny_config(models, attackers=[{"kind": "filter", "keep": 0.5, "objective": "fkl"}], seeds=[0])
    sweep.run_game(cfg, tmp_path / "kd")
    rows = [json.loads(x) for x in (tmp_path / "kd" / "results.jsonl").read_text().splitlines()]
    assert {r["n_trained"] for r in rows} == {3}
    forced = tiny_config(models, attackers=[{"kind": "passive"}], answer_forcing=True)
    sweep.run_game(forced, tmp_path / "forced")
    rows = [json.loads(x) for x in (tmp_path / "forced" / "results.jsonl").read_text().splitlines()]
    assert all("teacher_accuracy_forced" in r for r in rows)
    recs = [json.loads(x) for d in (tmp_path / "forced" / "traces").iterdir() for x in
            (d / "traces.jsonl").read_text().splitlines()]
    assert all("Answer: " in r["forced_completion"] for r in recs)
    assert all(r["forced_completion"] == r["completion"] for r in recs if not r["forced"])


def test_cli_game(models, tmp_path, capsys):
    from distillarena.cli import main

    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({"budget": 99, "prompts": {"pool": 10}}))
    assert main(["game", str(p), "--out", str(tmp_path / "run")]) == 2
    assert "larger than the prompt pool" in capsys.readouterr().err
    assert main(["game", "--out", str(tmp_path / "nothing"), "--report-only"]) == 2


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    files = sorted(root.glob("game*.yaml"))
    assert files
    for f in files:
        load_config(f, GameConfig)
    assert load_config(root / "game.yaml", GameConfig) == GameConfig()  # the file spells out the defaults
