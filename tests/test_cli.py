import subprocess
import sys

import pytest

from distillarena.cli import main
from distillarena.core.config import load_config
from distillarena.core.errors import UserError
from distillarena.recipes.config import DemoConfig
from distillarena.train.config import TeacherConfig


def test_defaults_validate():
    assert DemoConfig().teacher.preset == "base"


def test_unknown_field_is_named_with_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  train:\n    stepz: 10\n")
    with pytest.raises(UserError) as e:
        load_config(f, DemoConfig)
    assert "teacher.train.stepz: unknown field" in str(e.value) and str(f) in str(e.value)


def test_ill_typed_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: many\n")
    with pytest.raises(UserError, match=r"train.steps: .*integer"):
        load_config(f, TeacherConfig)
    f.write_text("task:\n  n_ops: [1, 7]\n")
    with pytest.raises(UserError, match=r"task.n_ops"):
        load_config(f, TeacherConfig)
    f.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(f, TeacherConfig)
    f.write_text("a: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(f, TeacherConfig)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distillarena.cli", *args], capture_output=True, text=True)


def test_cli_bad_config_exits_cleanly(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  presett: base\n")
    r = run_cli("demo", str(f), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "teacher.presett: unknown field" in r.stderr and str(f) in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_files_exit_cleanly(tmp_path, capsys):
    assert main(["teach", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert main(["demo", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep me"
