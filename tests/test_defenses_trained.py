"""Defenses on the trained built-in teacher: stronger defense, lower utility (slow: trains or reuses models)."""

import pytest
import torch

from distillarena.defenses.policy import build_policy
from distillarena.evaluate.task_eval import evaluate_problems
from distillarena.game.config import default_proxy
from distillarena.game.traces import holdout_gradient
from distillarena.models.presets import load_model, load_tokenizer
from distillarena.tasks.arithmetic import ArithmeticTask
from distillarena.train.config import TeacherConfig
from distillarena.train.teacher import teach

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rich.console import Console

    console = Console(quiet=True)
    t = teach(TeacherConfig(), console=console)
    p = teach(default_proxy().teach, console=console)
    teacher, tok = load_model(str(t.path)), load_tokenizer(str(t.path))
    proxy = load_model(str(p.path))
    problems = ArithmeticTask().problems("test", 96, [2, 3], seed=0)
    return teacher, tok, proxy, problems, console


def utility(world, kind, params, gradient=None):
    teacher, tok, proxy, problems, _ = world
    policy = build_policy(kind, params, teacher=teacher, tokenizer=tok, proxy=proxy, proxy_tokenizer=tok,
                          gradient=gradient)

    def fn(ids, mask):
        return policy.sample(teacher, ids, mask, max_new_tokens=48, generator=torch.Generator().manual_seed(0),
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    return evaluate_problems(teacher, tok, problems, max_new_tokens=48, sample_fn=fn)


def assert_monotone(evals, tol_acc=0.06, tol_kl=1e-3):
    accs = [e.accuracy for e in evals]
    kls = [e.kl_to_undefended for e in evals]
    for a, b in zip(accs, accs[1:], strict=False):
        assert b <= a + tol_acc, accs
    for a, b in zip(kls, kls[1:], strict=False):
        assert b >= a - tol_kl, kls
    assert accs[-1] < accs[0] and kls[-1] > kls[0], (accs, kls)


def test_poe_strength_lowers_utility(world):
    assert_monotone([utility(world, "poe", {"gamma": g}) for g in (0.0, 0.3, 0.6, 0.9)])


def test_antidistillation_strength_lowers_utility(world):
    teacher, tok, proxy, problems, console = world
    g = holdout_gradient(proxy, tok, 128, ArithmeticTask(), console)
    assert_monotone([utility(world, "antidistillation", {"lam": lam}, g) for lam in (0.0, 3.0, 10.0, 30.0)])
