import json

from distillarena.cli import main
from distillarena.train.config import TeacherConfig
from distillarena.train.teacher import INFO_FILE, teach

TINY = """
teacher:
  preset: tiny
  train: {steps: 30, batch_size: 16, eval_every: 15, log_every: 5}
eval: {n_per_difficulty: 6, difficulties: [1, 2, 3, 4], max_new_tokens: 40}
distill: null
game: null
"""

# the whole story at toy size: teacher, two objectives, the game with PoE against passive and adaptive students
STORY = """
teacher: {preset: tiny, train: {steps: 30, batch_size: 16, eval_every: 0}}
eval: {difficulties: [1, 3], n_per_difficulty: 4, max_new_tokens: 40}
distill:
  objectives: [hpd, sft]
  train: {steps: 4, batch_size: 8, eval_every: 2}
  eval: {n_examples: 8, n_problems: 6, max_new_tokens: 40}
  data: {train_size: 32}
game:
  student: {teach: {preset: tiny, task: {n_ops: [1, 2]}, train: {steps: 10, batch_size: 16, eval_every: 0}}}
  defenses:
    - kind: poe
      strengths: [{gamma: 0.7}]
      proxy: {teach: {preset: tiny, train: {steps: 5, batch_size: 8, eval_every: 0}}}
  budget: 16
  prompts: {pool: 32}
  holdout: 8
  max_new_tokens: 40
  train: {steps: 3, batch_size: 8}
  eval: {n_problems: 8, entropy_problems: 4, max_new_tokens: 40}
  oracle: {n_traces: 4}
"""


def test_demo_writes_a_run_folder_and_reuses_the_teacher(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "run"
    assert main(["demo", str(cfg), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "accuracy by difficulty" in html and "entropy" in html
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in records}
    assert {"teacher_train", "teacher_eval", "teacher_entropy"} <= phases
    assert sorted(r["difficulty"] for r in records if r["phase"] == "teacher_eval") == [1, 2, 3, 4]
    assert "preset: tiny" in (out / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_cached"] is False
    # a second demo reuses the cached teacher instead of retraining
    assert main(["demo", str(cfg), "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["teacher_cached"] is True


def test_demo_tells_the_whole_story(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(STORY)
    out = tmp_path / "run"
    assert main(["demo", str(cfg), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    for section in ("Findings", "Distillation: HPD against", "Frontier", "Cost of each defense",
                    "Example traces", "Per-position entropy"):
        assert section in html, section
    phases = {json.loads(x)["phase"] for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"teacher_train", "teacher_eval", "distill_eval", "game_cell"} <= phases
    summary = json.loads((out / "summary.json").read_text())
    assert [f["number"] for f in summary["findings"]] == [1, 2, 3, 4]
    assert summary["findings"][2]["verdict"] == "not measured"  # no antidistillation in this game
    assert {(d["objective"], d["seed"]) for d in summary["distill"]} == {("hpd", 0), ("sft", 0)}
    assert all((out / "distill" / f"{o}-seed0" / "student" / "config.json").is_file() for o in ("hpd", "sft"))
    # the game: the undefended reference and PoE, against the demo's four attackers (passive, adaptive, value tilt,
    # verifier filter), one seed
    assert summary["game"]["cells"] == 8
    assert (out / "game" / "results.csv").is_file()
    assert set(summary["phase_seconds"]) == {"teacher", "teacher_eval", "distill", "game"}
    # rerun on the same folder: finished distillation runs and game cells are kept, not recomputed
    csv = (out / "game" / "results.csv").read_text()
    assert main(["demo", str(cfg), "--out", str(out), "--overwrite"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert [d["wall_seconds"] for d in again["distill"]] == [d["wall_seconds"] for d in summary["distill"]]
    assert (out / "game" / "results.csv").read_text() == csv


def test_demo_sections_override_the_demo_defaults_field_by_field():
    from distillarena.recipes.config import DemoConfig, demo_game

    c = DemoConfig.model_validate({"game": {"seeds": [0, 1, 2]}, "teacher": {"task": {"n_ops": [1, 2]}}})
    assert c.game.seeds == [0, 1, 2] and c.game.budget == demo_game().budget  # the rest stays the demo's
    assert c.game.teacher.teach == c.teacher  # the game plays the demo's own teacher
    assert c.distill.data.task.n_ops == [1, 2]  # and distils on its task
    assert DemoConfig.model_validate(c.model_dump(mode="json")) == c  # the run folder's config.yaml reloads


def test_demo_refuses_a_game_with_another_teacher():
    import pytest

    from distillarena.recipes.config import DemoConfig

    with pytest.raises(ValueError, match="game.teacher differs"):
        DemoConfig.model_validate({"game": {"teacher": {"teach": {"preset": "tiny"}}}})


def test_teacher_cache_key_follows_the_config(tmp_path):
    a = TeacherConfig(preset="tiny")
    b = TeacherConfig(preset="tiny", train={"steps": 31})
    assert a.cache_key("tok") != b.cache_key("tok")
    assert a.cache_key("tok") == TeacherConfig(preset="tiny").cache_key("tok")


def test_teach_exports_a_loadable_folder(tmp_path):
    cfg = TeacherConfig(preset="tiny", train={"steps": 3, "batch_size": 4, "eval_every": 0})
    result = teach(cfg)
    assert (result.path / INFO_FILE).exists() and (result.path / "model.safetensors").exists()
