import json

import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.defenses.policy import build_policy
from distillarena.evaluate.task_eval import evaluate_problems
from distillarena.game.config import TracesConfig
from distillarena.game.traces import run_traces
from distillarena.models.presets import build_preset
from distillarena.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def saved_models(task_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, preset, seed in (("teacher", "small", 0), ("proxy", "tiny", 1)):
        m = build_preset(preset, task_tok, seed=seed)
        m.save_pretrained(root / name)
        task_tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def traces_config(paths, **defense):
    return TracesConfig.model_validate({
        "teacher": {"path": paths["teacher"]},
        "defense": {"proxy": {"path": paths["proxy"]}, **defense},
        "prompts": {"n": 10, "n_ops": [1, 2]},
        "reveal": {"top_k": 3, "decimals": 2},
        "max_new_tokens": 12, "batch_size": 4, "seed": 5,
    })


def test_policy_bad_input(task_tok):
    with pytest.raises(UserError, match="unknown defense"):
        build_policy("blur")
    with pytest.raises(UserError, match="does not take gamma"):
        build_policy("temperature", {"gamma": 0.3})
    with pytest.raises(UserError, match="needs a proxy"):
        build_policy("poe", {"gamma": 0.3})
    proxy = build_preset("tiny", task_tok)
    with pytest.raises(UserError, match="holdout gradient"):
        build_policy("antidistillation", {"lam": 1.0}, proxy=proxy)
    with pytest.raises(UserError, match="gamma must be in"):
        build_policy("poe", {"gamma": 1.5}, proxy=proxy)


def test_traces_resume_after_a_crash_equals_one_run(saved_models, tmp_path):
    cfg = traces_config(saved_models, kind="poe", params={"gamma": 0.5})
    whole = tmp_path / "whole.jsonl"
    run_traces(cfg, whole)
    lines = whole.read_text().splitlines(keepends=True)
    assert len(lines) == 10
    # a crash after 5 traces, in the middle of writing the 6th
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text("".join(lines[:5]) + lines[5][:17])
    summary = run_traces(cfg, crashed)
    assert summary["new"] == 5 and summary["traces"] == 10
    a = sorted((json.loads(x) for x in lines), key=lambda r: r["index"])
    b = sorted((json.loads(x) for x in crashed.read_text().splitlines()), key=lambda r: r["index"])
    assert a == b
    r = a[0]
    assert r["defense"] == "poe" and r["params"] == {"gamma": 0.5} and r["seed"] == 5
    assert len(r["tokens"]) == len(r["logprobs"]) == len(r["teacher_logprobs"]) == len(r["top_ids"])
    assert all(len(row) == 3 for row in r["top_logprobs"])
    assert all(round(v, 2) == v for row in r["top_logprobs"] for v in row)
    # a finished file is left as is
    assert run_traces(cfg, crashed)["new"] == 0


def test_antidistillation_traces_cache_the_gradient(saved_models, tmp_path):
    from distillarena.core.io import cache_dir

    cfg = traces_config(saved_models, kind="antidistillation", params={"lam": 0.5, "temperature": 0.8},
                        holdout_traces=16)

    def gradients() -> set:
        # the cache is shared by the whole session: other tests may have cached gradients of their own proxies
        return set((cache_dir() / "proxy_gradients").glob("*.safetensors"))

    before = gradients()
    run_traces(cfg, tmp_path / "a.jsonl")
    first = gradients()
    assert len(first - before) <= 1 and first  # computed once (or already cached by an earlier test)
    run_traces(cfg, tmp_path / "b.jsonl")  # reuses the cached gradient
    assert gradients() == first


def test_utility_of_a_defended_teacher(task_tok):
    teacher = build_preset("small", task_tok, seed=0)
    proxy = build_preset("tiny", task_tok, seed=1)
    problems = ArithmeticTask().problems("test", 8, 2, seed=0)

    def util(kind, params):
        policy = build_policy(kind, params, teacher=teacher, tokenizer=task_tok, proxy=proxy,
                              proxy_tokenizer=task_tok)

        def fn(ids, mask):
            return policy.sample(teacher, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(0),
                                 eos_token_id=task_tok.eos_token_id, pad_token_id=task_tok.pad_token_id)

        return evaluate_problems(teacher, task_tok, problems, max_new_tokens=10, sample_fn=fn)

    undefended = util("none", {})
    off = util("poe", {"gamma": 0.0})
    on = util("poe", {"gamma": 0.7})
    assert undefended.kl_to_undefended == pytest.approx(0.0, abs=1e-5)
    assert off.samples == undefended.samples  # gamma 0 is exactly the undefended teacher
    assert on.kl_to_undefended > 0.01
    assert util("temperature", {"temperature": 2.0}).kl_to_undefended > 1e-3  # near-uniform random model
