import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillarena.core.errors import UserError
from distillarena.tasks.arithmetic import (
    ArithmeticConfig,
    ArithmeticTask,
    Node,
    Problem,
    check_answer,
    extract_answer,
    step_validity,
)


def leaf(v):
    return Node(value=v)


def test_independent_subexpressions_have_both_orders():
    # 2*3+4*5: the two products are independent, so two orders; the sum always comes last.
    p = Problem(Node("+", left=Node("*", left=leaf(2), right=leaf(3)), right=Node("*", left=leaf(4), right=leaf(5))))
    assert p.expression == "2*3+4*5"
    assert p.answer == 26
    assert sorted(p.all_solutions()) == sorted(
        ["2*3=6\n4*5=20\n6+20=26\nAnswer: 26", "4*5=20\n2*3=6\n6+20=26\nAnswer: 26"]
    )


def test_chain_has_one_order_and_parentheses_keep_the_tree():
    p = Problem(Node("-", left=leaf(9), right=Node("-", left=leaf(5), right=leaf(3))))
    assert p.expression == "9-(5-3)"
    assert p.answer == 7
    assert p.all_solutions() == ["5-3=2\n9-2=7\nAnswer: 7"]
    q = Problem(Node("*", left=Node("+", left=leaf(1), right=leaf(2)), right=leaf(4)))
    assert q.expression == "(1+2)*4" and q.answer == 12


def test_word_rendering_is_unambiguous():
    p = Problem(Node("*", left=leaf(6), right=Node("+", left=leaf(2), right=leaf(3))), style="words")
    assert p.prompt == "What is the product of 6 and the sum of 2 and 3?\n"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_ops=st.integers(1, 4), words=st.booleans())
def test_every_valid_order_is_correct(seed, n_ops, words):
    task = ArithmeticTask(ArithmeticConfig(word_fraction=1.0 if words else 0.0))
    p = task.sample(random.Random(seed), n_ops)
    assert p.n_ops == n_ops
    solutions = p.all_solutions()
    assert len(set(solutions)) == len(p.step_orders) >= 1
    for s in solutions:
        assert check_answer(p, s)
        assert step_validity(s) == 1.0
        assert len(s.splitlines()) == n_ops + 1
    # the expression text evaluates to the answer under Python's precedence rules
    assert eval(p.expression) == p.answer  # noqa: S307 - digits and + - * ( ) only


def test_multi_order_problems_are_common_at_higher_difficulty():
    task = ArithmeticTask()
    for n_ops, at_least in ((3, 0.3), (4, 0.6)):
        ps = task.problems("train", 300, n_ops, seed=1)
        share = sum(len(p.step_orders) > 1 for p in ps) / len(ps)
        assert share >= at_least, (n_ops, share)


def test_numbers_stay_in_range():
    cfg = ArithmeticConfig()
    for p in ArithmeticTask(cfg).problems("train", 300, [1, 2, 3, 4], seed=3):
        for line in p.solution().splitlines()[:-1]:
            value = int(line.split("=")[1])
            assert cfg.min_value <= value <= cfg.max_value


def test_splits_are_seeded_and_disjoint():
    task = ArithmeticTask()
    a = task.problems("test", 200, [1, 2, 3], seed=7)
    b = task.problems("test", 200, [1, 2, 3], seed=7)
    assert [p.expression for p in a] == [p.expression for p in b]
    assert [p.expression for p in task.problems("test", 200, [1, 2, 3], seed=8)] != [p.expression for p in a]
    sets = {s: {p.expression for p in task.problems(s, 300, [1, 2, 3], seed=0)} for s in ("train", "holdout", "test")}
    assert not sets["train"] & sets["holdout"]
    assert not sets["train"] & sets["test"]
    assert not sets["holdout"] & sets["test"]
    assert all(len(v) == 300 for v in sets.values())  # distinct within a split


def test_difficulty_mix_is_even():
    ps = ArithmeticTask().problems("holdout", 100, [1, 4], seed=0)
    assert sum(p.n_ops == 1 for p in ps) == 50 and sum(p.n_ops == 4 for p in ps) == 50


def test_checkers():
    assert extract_answer("3+4=7\nAnswer: 7") == 7
    assert extract_answer("no answer here") is None
    assert not check_answer(8, "3+4=7\nAnswer: 7")
    assert step_validity("3+4=7\n7*2=15\nAnswer: 15") == 0.5
    assert step_validity("garbage\n3+4=7\nAnswer: 7") == 0.5
    assert step_validity("Answer: 7") == 0.0


def test_bad_difficulty_and_split():
    with pytest.raises(UserError, match="between 1 and 4"):
        ArithmeticTask().sample(random.Random(0), 5)
    with pytest.raises(UserError, match="unknown split"):
        ArithmeticTask().problems("validation", 10, 1)
    with pytest.raises(UserError, match="too small"):
        ArithmeticTask(ArithmeticConfig(add_min=1, add_max=2, min_value=0)).problems("test", 500, 1)
    with pytest.raises(UserError, match="invalid arithmetic ranges"):
        ArithmeticConfig(add_min=50, add_max=20)


def test_swapped_first_operands_are_a_second_mode_at_the_first_token():
    import random

    from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask, _operation_nodes, step_validity

    task = ArithmeticTask(ArithmeticConfig(commute=0.5))
    problems = task.problems("train", 200, [1, 2], seed=0)
    for p in problems:  # each step order twice when its first step is a + or a *
        nodes = _operation_nodes(p.tree)
        assert p.n_solutions == sum(2 if nodes[o[0]].op in "+*" else 1 for o in p.step_orders)
    share = sum(p.n_solutions > 1 for p in problems) / len(problems)
    assert 0.5 < share < 0.9  # subtraction first steps have one solution
    rng = random.Random(0)
    swapped = total = 0
    for p in problems:
        sol = p.random_solution(rng)
        assert step_validity(sol) == 1.0 and sol.endswith(f"Answer: {p.answer}")
        if p.n_solutions > 1 and len(p.step_orders) == 1:
            canonical = p.solution()
            total += 1
            swapped += sol != canonical
            assert sol.split("\n")[1:] == canonical.split("\n")[1:]  # only the first step may differ
    assert 0.3 < swapped / total < 0.7


def test_without_swaps_the_data_is_what_it_was():
    import random

    from distillarena.tasks.arithmetic import ArithmeticTask

    problems = ArithmeticTask().problems("train", 50, [1, 2, 3], seed=1)
    a, b = random.Random(7), random.Random(7)
    for p in problems:
        assert p.n_solutions == len(p.step_orders)
        assert p.random_solution(a) == p.solution(b.choice(p.step_orders))  # the same draws, nothing more
