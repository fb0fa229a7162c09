import json

from distillarena.cli import main
from distillarena.config import TeacherConfig
from distillarena.recipes.teach import INFO_FILE, teach

TINY = """
teacher:
  preset: tiny
  train: {steps: 30, batch_size: 16, eval_every: 15, log_every: 5}
eval: {n_per_difficulty: 6, difficulties: [1, 2, 3, 4], max_new_tokens: 40}
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


def test_teacher_cache_key_follows_the_config(tmp_path):
    a = TeacherConfig(preset="tiny")
    b = TeacherConfig(preset="tiny", train={"steps": 31})
    assert a.cache_key("tok") != b.cache_key("tok")
    assert a.cache_key("tok") == TeacherConfig(preset="tiny").cache_key("tok")


def test_teach_exports_a_loadable_folder(tmp_path):
    cfg = TeacherConfig(preset="tiny", train={"steps": 3, "batch_size": 4, "eval_every": 0})
    result = teach(cfg)
    assert (result.path / INFO_FILE).exists() and (result.path / "model.safetensors").exists()
