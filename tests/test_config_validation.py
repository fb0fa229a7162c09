"""Every config is validated whole when its YAML loads: a bad defense parameter, an attacker's unknown objective or
a key policy's bad value is an error naming the file and the field, before any model is trained or loaded."""

import pytest

from distillarena.core.config import load_config
from distillarena.core.errors import UserError
from distillarena.game.config import GameConfig, TracesConfig
from distillarena.recipes.config import DemoConfig


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("yaml_text,where,what", [
    ("defenses: [{kind: poe, strengths: [{gamma: 1.5}]}]\n", "defenses.0", "poe gamma must be in [0, 1]"),
    ("defenses: [{kind: temperature, strengths: [{gamma: 0.3}]}]\n", "defenses.0", "does not take gamma"),
    ("defenses: [{kind: truncation, strengths: [{top_k: 2.5}]}]\n", "defenses.0", "top_k must be an integer"),
    ("defenses: [{kind: antidistillation, strengths: [{method: exact}]}]\n", "defenses.0", "method must be"),
    ("defenses: [{kind: blur}]\n", "defenses.0.kind", "Input should be"),
    ("defenses: [{kind: watermark, strengths: [{gamma: 1.0}]}]\n", "defenses.0", "watermark gamma must be in (0, 1)"),
    ("attackers: [{kind: passive, objective: nope}]\n", "attackers.0.objective", "unknown objective 'nope'"),
    ("attackers: [{kind: passive, objective: akl}]\n", "attackers.0.objective", "cannot learn from revealed top-k"),
])
def test_a_bad_game_config_is_refused_when_it_loads(tmp_path, yaml_text, where, what):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, yaml_text), GameConfig)
    msg = str(e.value)
    assert "cfg.yaml" in msg and where in msg and what in msg, msg


def test_traces_and_demo_configs_check_their_defenses_too(tmp_path):
    with pytest.raises(UserError, match=r"defense.*poe gamma must be in"):
        load_config(write(tmp_path, "defense: {kind: poe, params: {gamma: -1}}\n"), TracesConfig)
    with pytest.raises(UserError, match=r"game.defenses.0.*temperature must be > 0"):
        load_config(write(tmp_path, "game: {defenses: [{kind: temperature, strengths: [{temperature: 0}]}]}\n"),
                    DemoConfig)


def test_attackers_take_any_objective_that_learns_from_text_or_top_k():
    cfg = GameConfig(attackers=[{"kind": "passive"}, {"kind": "passive", "objective": "rkl"}],
                     reveal={"top_k": 5})
    assert [a.label for a in cfg.attackers] == ["passive", "passive+rkl"]
    assert [a.learns_from_teacher for a in cfg.attackers] == [False, True]
    with pytest.raises(ValueError, match="reveal.top_k"):
        GameConfig(attackers=[{"kind": "passive", "objective": "jsd"}])
