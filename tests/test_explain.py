"""``distillarena explain``: the animations come from the objectives' and defenses' own outputs, the page embeds
every one of them and opens offline, and bad run folders are clear errors."""

import base64
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from distillarena.cli import main
from distillarena.core.config import dump_config
from distillarena.core.errors import UserError
from distillarena.game.config import GameConfig, GameDefense
from distillarena.objectives import TeacherSignal, compute_objective
from distillarena.report.explain import TEACHER_HUMPS, TokenView, fit_modes

TINY = """
modes: {steps: 30, record_every: 10}
students: {steps: 4, frames: 2, batch_size: 4, train_size: 16, probes: 4}
defenses: {frames: 3, draws: 20, holdout_traces: 8}
fps: 4
dpi: 40
"""


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory, task_tok):
    from distillarena.models.presets import build_preset

    model = build_preset("tiny", task_tok, seed=7)
    path = tmp_path_factory.mktemp("proxy") / "tiny-proxy"
    model.save_pretrained(path)
    task_tok.save_pretrained(path)
    return path


def fake_game(folder, rows):
    """A game run folder as ``distillarena game`` leaves it, as far as explain reads it."""
    folder.mkdir(parents=True)
    (folder / "game.json").write_text("{}")
    cfg = GameConfig(defenses=[GameDefense(kind="poe", strengths=[{"gamma": 0.5}])])
    (folder / "config.yaml").write_text(dump_config(cfg))
    (folder / "summary.json").write_text(json.dumps({"rows": rows}))
    return folder


ROWS = [
    {"defense_label": "none", "defense": "none", "params": {}, "attacker": "passive", "recovery": 1.0,
     "teacher_accuracy": 0.6},
    {"defense_label": "poe(gamma=0.5)", "defense": "poe", "params": {"gamma": 0.5}, "attacker": "passive",
     "recovery": 0.4, "teacher_accuracy": 0.5},
    {"defense_label": "temperature(temperature=1.6)", "defense": "temperature", "params": {"temperature": 1.6},
     "attacker": "passive", "recovery": 0.7, "teacher_accuracy": 0.45},
    {"defense_label": "poe(gamma=0.9)", "defense": "poe", "params": {"gamma": 0.9}, "attacker": "passive",
     "recovery": float("nan"), "teacher_accuracy": 0.3},  # undefined: left out
]


# --- 1. mode covering vs mode seeking: a case with a known answer ------------------------------------------------


def test_forward_kl_covers_both_humps_and_reverse_kl_seeks_one():
    fit = fit_modes(("fkl", "rkl"), steps=300, record_every=50)
    # forward KL over a family with sufficient statistics x and x^2 matches the teacher's mean and spread
    t_mean, t_sd = fit.moments(fit.teacher)
    s_mean, s_sd = fit.moments(fit.students["fkl"][-1])
    assert abs(s_mean - t_mean) < 0.05 and abs(s_sd - t_sd) < 0.05
    assert 0.3 < fit.left_share("fkl") < 0.7  # probability on both humps
    # reverse KL ends on one hump (the right one: the student starts just right of the middle)
    assert fit.left_share("rkl") < 0.03
    r_mean, r_sd = fit.moments(fit.students["rkl"][-1])
    right = TEACHER_HUMPS[1]
    assert abs(r_mean - right[0]) < 0.1 and abs(r_sd - right[1]) < 0.1
    assert fit.steps == [0, 50, 100, 150, 200, 250, 300] and fit.students["fkl"].shape == (7, 41)


def test_mode_frames_are_the_objectives_outputs():
    fit = fit_modes(("fkl", "rkl", "hpd"), steps=12, record_every=4)
    # each divergence's own loss at every step is exactly the yardstick computed for that student
    np.testing.assert_allclose(fit.losses["fkl"], fit.fkl["fkl"][:-1], rtol=1e-9)
    np.testing.assert_allclose(fit.losses["rkl"], fit.rkl["rkl"][:-1], rtol=1e-9)
    # and every drawn frame's distance is compute_objective's on that frame's distribution
    lp = torch.log(torch.as_tensor(fit.teacher))
    for k, step in enumerate(fit.steps):
        q = torch.as_tensor(fit.students["hpd"][k])
        fkl = compute_objective("fkl", torch.log(q)[None], TeacherSignal.dense(lp[None])).loss_sum
        assert float(fkl) == pytest.approx(fit.fkl["hpd"][step], rel=1e-6)
    assert not np.allclose(fit.students["hpd"][0], fit.students["hpd"][-1])  # it moved


def test_token_view_projects_and_counts():
    view = TokenView([3, 1], ["c", "a", "other"])
    np.testing.assert_allclose(view.project(np.array([0.1, 0.2, 0.3, 0.4])), [0.4, 0.2, 0.4])
    assert view.count(np.array([3, 3, 1, 0, 2])).tolist() == [2, 1, 2]


# --- 3. the defenses at one position are build_policy's ------------------------------------------------------------


def test_defense_frames_are_the_policies_distributions(tiny_teacher, proxy_dir):
    from distillarena.defenses.antidistillation import compute_proxy_gradient
    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.recipes.explain import ExplainDefenses, defense_sweeps

    teacher, tok = load_model(str(tiny_teacher)), load_tokenizer(str(tiny_teacher))
    proxy = load_model(str(proxy_dir))
    ids = torch.tensor([tok("What is 12+34?\n")["input_ids"]])
    grad = compute_proxy_gradient(proxy, [{"input_ids": ids}], tokenizer=tok)
    top = [int(i) for i in torch.topk(teacher(input_ids=ids).logits[0, -1], 5).indices]
    view = TokenView(top, [str(i) for i in top] + ["other"])
    d = ExplainDefenses(frames=3, draws=50, temperature=(0.5, 2.0), gamma=(0.0, 1.0), lam=(0.0, 0.3))
    sweeps = {s.kind: s for s in defense_sweeps(d, teacher, tok, proxy, tok, grad, ids[0].tolist(), view)}
    with torch.no_grad():
        z = teacher(input_ids=ids).logits[0, -1].float()
        zp = proxy(input_ids=ids).logits[0, -1].float()
    t = sweeps["temperature"]
    assert t.values == [0.5, 1.25, 2.0]
    for k, temp in enumerate(t.values):
        np.testing.assert_allclose(t.probs[k], view.project(torch.softmax(z / temp, -1).numpy()), atol=1e-5)
    poe = sweeps["poe"]
    np.testing.assert_allclose(poe.probs[0], view.project(torch.softmax(z, -1).numpy()), atol=1e-5)  # gamma 0
    np.testing.assert_allclose(poe.probs[-1], view.project(torch.softmax(zp, -1).numpy()), atol=1e-5)  # gamma 1
    ad = sweeps["antidistillation"]
    np.testing.assert_allclose(ad.probs[0], view.project(torch.softmax(z, -1).numpy()), atol=1e-5)  # lambda 0
    assert not np.allclose(ad.probs[-1], ad.probs[0])
    for s in sweeps.values():
        assert s.draws.shape == s.probs.shape and (s.draws.sum(-1) == 50).all()
        assert s.probs.sum(-1) == pytest.approx(1.0, abs=1e-5)


# --- the command ---------------------------------------------------------------------------------------------------


def test_explain_writes_a_self_contained_page_with_every_animation(tmp_path, tiny_teacher, proxy_dir):
    cfg = tmp_path / "explain.yaml"
    cfg.write_text(TINY + f"teacher: {{path: {tiny_teacher}}}\nproxy: {{path: {proxy_dir}}}\n")
    game = fake_game(tmp_path / "demo" / "game", ROWS)  # a demo folder: the game in its game/ subfolder
    out = tmp_path / "out"
    assert main(["explain", str(cfg), "--from", str(game.parent), "--out", str(out)]) == 0
    page = (out / "explainer.html").read_text()
    embedded = re.findall(r"src='data:image/gif;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == 4
    for name, data in zip(("modes", "task", "defenses", "frontier"), embedded, strict=True):
        gif = out / "explainer" / f"{name}.gif"
        assert base64.b64decode(data) == gif.read_bytes()  # the page embeds exactly the shared file
        with Image.open(gif) as im:
            assert im.format == "GIF" and im.n_frames >= 3, (name, im.n_frames)
    # self-contained: nothing fetched when it opens
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page) and "<script" not in page and "<link" not in page
    for words in ("What to watch", "Forward KL", "HPD", "PoE", "antidistillation", "3 cells"):
        assert words in page, words
    info = json.loads((out / "explainer" / "explainer.json").read_text())
    assert info["teacher"] == str(tiny_teacher) and info["game"] == str(game)


def test_explain_without_a_game_writes_three_animations(tmp_path, tiny_teacher, proxy_dir):
    cfg = tmp_path / "explain.yaml"
    cfg.write_text(TINY + f"teacher: {{path: {tiny_teacher}}}\nproxy: {{path: {proxy_dir}}}\n")
    out = tmp_path / "out"
    assert main(["explain", str(cfg), "--out", str(out)]) == 0
    page = (out / "explainer.html").read_text()
    assert page.count("data:image/gif;base64,") == 3 and "--from RUN_DIR" in page
    assert sorted(p.name for p in (out / "explainer").glob("*.gif")) == ["defenses.gif", "modes.gif", "task.gif"]


def test_bad_run_folders_are_clear_errors(tmp_path, capsys):
    from distillarena.recipes.explain import find_game

    missing = tmp_path / "nope"
    assert main(["explain", "--from", str(missing)]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert not missing.exists()
    no_game = tmp_path / "distill-run"
    no_game.mkdir()
    (no_game / "summary.json").write_text("{}")
    assert main(["explain", "--from", str(no_game)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder with a game" in err and "Traceback" not in err
    unfinished = tmp_path / "game-run"
    unfinished.mkdir()
    (unfinished / "game.json").write_text("{}")
    with pytest.raises(UserError, match="no results yet"):
        find_game(unfinished)
    bad = tmp_path / "bad.yaml"
    bad.write_text("students: {objectives: [nope]}\n")
    assert main(["explain", str(bad)]) == 2
    assert "unknown objective 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_defaults_on_the_built_in_world(tmp_path):
    """The real thing (about a minute with the built-in teacher cached, longer when it trains the tiny fallback)."""
    out = tmp_path / "out"
    assert main(["explain", "--out", str(out)]) == 0
    assert (out / "explainer.html").read_text().count("data:image/gif;base64,") == 3


def test_the_demo_report_links_to_the_explainer(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("teacher: {preset: tiny, train: {steps: 5, batch_size: 8, eval_every: 0}}\n"
                   "eval: {n_per_difficulty: 2, difficulties: [1], max_new_tokens: 24}\ndistill: null\ngame: null\n")
    assert main(["demo", str(cfg), "--out", str(tmp_path / "run")]) == 0
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<a href='explainer.html'>" in report and "distillarena explain --from" in report
