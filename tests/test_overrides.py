"""``--set key.path=value`` on every command that reads a config: set into the config before validation, so a
wrong path or value is refused like a wrong YAML field, naming it."""

import argparse

import pytest

from distillarena.cli import build_parser, main
from distillarena.core.config import apply_overrides, config_overrides, load_config, parse_override
from distillarena.core.errors import UserError
from distillarena.game.config import GameConfig
from distillarena.serve.config import ServeConfig
from distillarena.train.config import DistillConfig


def test_values_are_read_as_yaml():
    assert parse_override("train.steps=50")[:2] == (("train", "steps"), 50)
    assert parse_override("student.dtype=bfloat16")[1] == "bfloat16"
    assert parse_override("seq_kd=true")[1] is True
    assert parse_override("student.path=")[1] is None
    assert parse_override("eval.difficulties=[1, 2]")[1] == [1, 2]
    assert parse_override("data.source=a=b.jsonl")[1] == "a=b.jsonl"  # only the first '=' splits
    for bad in ("train.steps", "=3", "train..steps=3"):
        with pytest.raises(UserError, match="KEY.PATH=VALUE"):
            parse_override(bad)


def test_overrides_create_sections_and_address_list_items():
    data = {"stages": [{"steps": 3}, {"steps": 4}], "train": None}
    out = apply_overrides(data, [parse_override(t) for t in
                                 ("stages.1.steps=9", "train.lr=1e-3", "teacher.api.model=m")])
    assert out == {"stages": [{"steps": 3}, {"steps": 9}], "train": {"lr": "1e-3"},
                   "teacher": {"api": {"model": "m"}}}
    with pytest.raises(UserError, match="not an index"):
        apply_overrides({"stages": []}, [parse_override("stages.0.steps=1")])
    with pytest.raises(UserError, match="objective is a str, not a section"):
        apply_overrides({"objective": "hpd"}, [parse_override("objective.beta=1")])


def test_overrides_are_validated_like_the_yaml(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("objective: fkl\ntrain: {steps: 10}\n")
    cfg = load_config(f, DistillConfig, [parse_override("train.steps=3"), parse_override("student.dtype=bfloat16"),
                                         parse_override("train.lr=1e-3")])
    assert (cfg.objective, cfg.train.steps, cfg.student.dtype, cfg.train.lr) == ("fkl", 3, "bfloat16", 1e-3)
    with pytest.raises(UserError, match=r"(?s)--set train.stepz=3.*train.stepz: unknown field"):
        load_config(f, DistillConfig, [parse_override("train.stepz=3")])
    with pytest.raises(UserError, match=r"student.dtype: .*float32.*bfloat16"):
        load_config(None, DistillConfig, [parse_override("student.dtype=float8")])


def test_the_command_line_reports_a_bad_override_naming_the_field(capsys):
    assert main(["distill", "--set", "train.steps=many"]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "--set train.steps=many" in err and "Traceback" not in err
    assert main(["game", "--set", "no_such_section.x=1"]) == 2
    assert "no_such_section: unknown field" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # malformed: argparse refuses it before anything runs
        build_parser().parse_args(["distill", "--set", "steps"])


def test_the_first_config_a_command_loads_takes_the_overrides():
    with config_overrides([parse_override("port=9")]) as used:
        assert load_config(None, ServeConfig).port == 9
        assert load_config(None, ServeConfig).port != 9  # e.g. a game config read by explain: untouched
    assert used == [True]
    assert load_config(None, GameConfig) == GameConfig()


def _leaves(parser, name=""):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, parser
    for a in subs:
        for n, p in a.choices.items():
            yield from _leaves(p, f"{name} {n}".strip())


def test_every_command_with_a_config_takes_set():
    leaves = dict(_leaves(build_parser()))
    with_config = {n for n, p in leaves.items() if any(a.dest == "config" for a in p._actions)}
    assert {"distill", "cache-teacher", "game", "demo", "teach", "serve", "traces", "explain"} <= with_config
    for n in with_config:
        assert any(a.dest == "overrides" for a in leaves[n]._actions), n
    assert build_parser().parse_args(["serve", "--set", "port=0"]).overrides[0][:2] == (("port",), 0)
