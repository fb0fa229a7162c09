"""The attacker table (issue 14): configs validated at load, each attacker in a world built so that it must win,
budget accounting, and the worst case over attackers."""

import json
import random
import subprocess
import sys

import pytest
import torch

from distillarena.attacks.plan import AttackContext, Plan, attacker_view
from distillarena.attacks.spec import ATTACKER_KINDS, ATTACKERS, KNOWLEDGE
from distillarena.core.config import load_config
from distillarena.core.errors import UserError
from distillarena.game.config import AttackerConfig, DefenseConfig, GameConfig
from distillarena.tasks.arithmetic import ArithmeticTask
from distillarena.tasks.data import Example, encode_example, problem_example

TASK = ArithmeticTask()


# --------------------------------------------------------------------------------------------------------------
# The table and the config
# --------------------------------------------------------------------------------------------------------------


def test_the_table_is_torch_free_and_every_kind_has_a_planner():
    code = "import sys, distillarena.attacks.spec as s; assert 'torch' not in sys.modules; print(len(s.ATTACKERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(ATTACKER_KINDS)
    from distillarena.attacks import get_planner

    for kind, spec in ATTACKERS.items():
        assert callable(get_planner(kind)) and spec.kind == kind
        assert set(spec.knows) <= set(KNOWLEDGE)  # the threat model names only declared kinds of knowledge


def test_attacker_configs_validate_each_kinds_parameters_at_load(tmp_path):
    cfg = GameConfig(attackers=[{"kind": "passive"}, {"kind": "value_tilt", "beta": 0.5},
                                {"kind": "value_tilt", "params": {"sign": -1}}, {"kind": "self_consistency", "k": 4},
                                {"kind": "verifier_filter", "pattern": r"Answer: -?\d+"},
                                {"kind": "invert_poe"}, {"kind": "invert_temperature"}, {"kind": "nll_filter"}],
                     reveal={"top_k": 5})
    labels = [a.label for a in cfg.attackers]
    assert labels == ["passive", "value_tilt(sign=+1)", "value_tilt(sign=-1)", "self_consistency(k=4)",
                      r"verifier_filter(pattern=Answer: -?\d+)", "invert_poe", "invert_temperature", "nll_filter"]
    assert [a.training_objective for a in cfg.attackers][-3:] == ["fkl", "fkl", "sft"]
    assert cfg.attackers[3].samples_per_prompt == 4 and cfg.attackers[3].spec.spend(cfg.attackers[3].p, 10).queries == 8
    p = tmp_path / "g.yaml"
    for text, where, what in [
        ("attackers: [{kind: value_tilt, beta: -1}]", "attackers.0.beta", "greater than or equal to 0"),
        ("attackers: [{kind: value_tilt, params: {warm: 3}}]", "attackers.0.params.warm", "does not take it"),
        ("attackers: [{kind: self_consistency, k: 1}]", "attackers.0.k", "greater than or equal to 2"),
        ("attackers: [{kind: verifier_filter, pattern: '(('}]", "attackers.0.pattern", "not a valid regular"),
        ("attackers: [{kind: verifier_filter, callable: 'nocolon'}]", "attackers.0.callable", "module:function"),
        ("attackers: [{kind: invert_poe}]", "attacker invert_poe", "set reveal.top_k"),
        ("attackers: [{kind: invert_poe, objective: sft}]\nreveal: {top_k: 3}", "attackers.0", "must learn from"),
        ("attackers: [{kind: nosuch}]", "attackers.0.kind", "Input should be"),
        ("attackers: [{kind: value_tilt, warm_fraction: 1}]", "attackers.0.warm_fraction", "less than 1"),
    ]:
        p.write_text(text + "\n")
        with pytest.raises(UserError) as e:
            load_config(p, GameConfig)
        assert where in str(e.value) and what in str(e.value), (text, str(e.value))


def test_the_papers_kinds_keep_their_labels_and_cache_keys():
    from distillarena.game.keys import digest

    a = AttackerConfig(kind="adaptive", beta=0.5)
    assert a.label == "adaptive(beta=0.5)" and AttackerConfig(kind="filter", keep=0.5).label == "filter(keep=0.5)"
    # the flat shape the cells of earlier run folders were keyed with (the old AttackerConfig's dump, name removed)
    old = {"kind": "adaptive", "beta": 0.5, "sign": 1, "clip": 3.0, "standardize": True, "eps": 0.01, "keep": 0.5,
           "objective": "sft"}
    assert digest(a.key_fields()) == digest(old)
    assert AttackerConfig(kind="passive", objective="fkl").label == "passive+fkl"


# --------------------------------------------------------------------------------------------------------------
# Worlds
# --------------------------------------------------------------------------------------------------------------


def wrong_step(problem) -> str:
    """The reference solution with the first step's result off by one and the answer recomputed from it wrongly."""
    lines = problem.solution().split("\n")
    left, value = lines[0].rsplit("=", 1)
    lines[0] = f"{left}={int(value) + 1}"
    lines[-1] = f"Answer: {problem.answer + 1}"
    return "\n".join(lines)


def wrong_step_right_answer(problem) -> str:
    lines = problem.solution().split("\n")
    left, value = lines[0].rsplit("=", 1)
    lines[0] = f"{left}={int(value) + 1}"
    return "\n".join(lines)


def make_ctx(tok, texts: list[tuple], *, student=None, samples_per_prompt=1, defense=None, sampling=None,
             holdout=None, load_model=None, records=None, cfg=None, encoded=None, topk=None) -> AttackContext:
    """A context over hand-made traces: ``texts`` is a list of ``(problem, completion)``."""
    if records is None:
        records = [{"index": i, "prompt": p.prompt, "completion": c, "tokens": [], "correct": TASK.check(p, c)}
                   for i, (p, c) in enumerate(texts)]
    problems = [p for p, _ in texts]
    if encoded is None:
        encoded = [encode_example(tok, Example(prompt=p.prompt, completion=c)) for p, c in texts]
    return AttackContext(
        records=[attacker_view(r) for r in records], encoded=encoded, topk=topk, student=student, tokenizer=tok,
        pad_id=tok.pad_token_id, task=TASK, problems=problems, defense=defense or DefenseConfig(),
        sampling=sampling or {}, cfg=cfg or GameConfig(), seed=0, objective="sft",
        holdout=holdout or (lambda source: []), load_model=load_model or (lambda ref: None), budget=len(records),
        samples_per_prompt=samples_per_prompt)


def correct_fraction(texts, keep):
    return sum(TASK.check(texts[i][0], texts[i][1]) for i in keep) / len(keep)


def test_the_attacker_does_not_see_the_referees_fields(task_tok):
    p = TASK.problems("train", 1, [2], seed=0)[0]
    ctx = make_ctx(task_tok, [(p, p.solution())])
    assert "correct" not in ctx.records[0] and ctx.records[0]["completion"] == p.solution()


def test_verifier_filter_keeps_exactly_the_traces_a_checker_accepts(task_tok):
    from distillarena.attacks import verifier
    from distillarena.attacks.spec import VerifierParams

    problems = TASK.problems("train", 24, [2], seed=1)
    texts = [(p, p.solution() if i % 3 == 0 else wrong_step(p) if i % 3 == 1 else wrong_step_right_answer(p))
             for i, p in enumerate(problems)]
    ctx = make_ctx(task_tok, texts)
    passive = list(range(len(texts)))
    by_answer = verifier.plan(ctx, VerifierParams()).keep
    assert by_answer == [i for i in passive if i % 3 != 1]  # injected arithmetic errors with a wrong answer: out
    by_steps = verifier.plan(ctx, VerifierParams(check="steps")).keep
    assert by_steps == [i for i in passive if i % 3 == 0]  # a wrong step with a lucky answer: out too
    assert correct_fraction(texts, by_answer) == 1.0 > correct_fraction(texts, passive)
    # a user's task: a regex, or a callable
    assert verifier.plan(ctx, VerifierParams(pattern=r"Answer: \d+$")).info["verifier"] == "none"
    keep = verifier.plan(ctx, VerifierParams(callable="tests.test_attackers:_even_answer")).keep
    assert keep == [i for i, (_, c) in enumerate(texts) if _even_answer("", c)]
    # nothing accepted: it trains on everything (as passive) and says so
    plan = verifier.plan(ctx, VerifierParams(pattern="no such text"))
    assert plan.keep == passive and "accepted no trace" in plan.info["verifier_fallback"]
    with pytest.raises(UserError, match="cannot be loaded"):
        verifier.plan(ctx, VerifierParams(callable="tests.test_attackers:nothing_here"))


def _even_answer(prompt: str, completion: str) -> bool:
    a = TASK.extract_answer(completion)
    return a is not None and int(a) % 2 == 0


def test_self_consistency_keeps_the_majority_answers_traces(task_tok):
    from distillarena.attacks import self_consistency
    from distillarena.attacks.spec import SelfConsistencyParams

    k = 5
    rng = random.Random(0)
    texts = []
    for p in TASK.problems("train", 12, [2], seed=2):
        # 3 of 5 samples right, the 2 wrong ones disagree with each other: the majority is right on every prompt
        samples = [p.solution()] * 3 + [wrong_step(p), wrong_step(p).replace(f"Answer: {p.answer + 1}",
                                                                             f"Answer: {p.answer + 7}")]
        rng.shuffle(samples)
        texts += [(p, s) for s in samples]
    ctx = make_ctx(task_tok, texts, samples_per_prompt=k)
    plan = self_consistency.plan(ctx, SelfConsistencyParams(k=k))
    assert correct_fraction(texts, plan.keep) == 1.0 and correct_fraction(texts, range(len(texts))) == 0.6
    assert len(plan.keep) == 36 and plan.info["majority_share"] == pytest.approx(0.6)
    one = self_consistency.plan(ctx, SelfConsistencyParams(k=k, keep="one"))
    assert len(one.keep) == 12 and correct_fraction(texts, one.keep) == 1.0
    assert self_consistency.majority(["3", None, "4", "4", "3"]) == "3"  # ties: the first seen
    assert self_consistency.majority([None, None]) is None


def test_nll_filter_keeps_what_the_student_finds_likely(task_tok, tiny_teacher):
    from distillarena.attacks import nll_filter
    from distillarena.attacks.spec import NLLFilterParams
    from distillarena.models.presets import load_model

    student = load_model(str(tiny_teacher))
    problems = TASK.problems("train", 8, [2], seed=3)
    gen = torch.Generator().manual_seed(0)
    enc = []
    for i, p in enumerate(problems):  # the student's own greedy text, or random tokens
        ids = task_tok(p.prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(8):
                nxt = int(student(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
        n = len(task_tok(p.prompt)["input_ids"])
        tail = ids[n:] if i % 2 == 0 else torch.randint(3, len(task_tok), (8,), generator=gen).tolist()
        enc.append((ids[:n] + tail, [-100] * n + tail))
    ctx = make_ctx(task_tok, [(p, "") for p in problems], student=student, encoded=enc)
    plan = nll_filter.plan(ctx, NLLFilterParams(keep=0.5))
    assert plan.keep == [0, 2, 4, 6]
    assert nll_filter.plan(ctx, NLLFilterParams(keep=0.5, prefer="high")).keep == [1, 3, 5, 7]


def corrupted_world(task_tok, n=6):
    """Clean reference solutions (the holdout's own distribution) and junk of the same length (as in
    tests/test_attacks.py)."""
    problems = TASK.problems("holdout", 2 * n, [1, 2], seed=0)
    clean = [encode_example(task_tok, problem_example(p)) for p in problems[:n]]
    holdout = [encode_example(task_tok, problem_example(p)) for p in problems[n:]]
    rng = random.Random(0)
    digits = [task_tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    junk = []
    for ids, labels in clean:
        p = sum(1 for x in labels if x == -100)
        tail = [rng.randrange(len(task_tok)) if rng.random() < 0.7 else rng.choice(digits) for _ in range(len(ids) - p)]
        junk.append((ids[:p] + tail, labels[:p] + tail))
    return problems[:n] * 2, clean + junk, holdout


def test_value_tilt_warm_start_cosine_value_prefers_clean_traces_and_runs_in_training(task_tok):
    torch.set_num_threads(1)
    from distillarena.attacks import value_tilt
    from distillarena.attacks.spec import ValueTiltParams
    from distillarena.game.attack import train_student
    from distillarena.models.presets import build_preset

    student = build_preset("tiny", task_tok, seed=0)
    problems, enc, holdout = corrupted_world(task_tok)
    cfg = GameConfig(train={"steps": 4, "batch_size": 4, "warmup_steps": 0}, oracle={"n_traces": 8, "lr": 1e-2},
                     attackers=[{"kind": "passive"}])
    ctx = make_ctx(task_tok, [(p, "") for p in problems], student=student, encoded=enc, cfg=cfg,
                   holdout=lambda source: holdout)
    # valued now (no warm start): the cosine value tilts towards the clean half, both signs
    params = ValueTiltParams(warm_fraction=0, beta=1.0)
    plan = value_tilt.plan(ctx, params)
    w = torch.tensor(plan.weights)
    assert float(w[:6].mean()) > 1.0 > float(w[6:].mean()) and w.mean() == pytest.approx(1.0)
    assert plan.info["oracle_n"] == 8 and len(plan.info["oracle_spearman_ci"]) == 2
    assert "spearman_value_gradnorm" in plan.info and "oracle_spearman_grad_norm" in plan.info
    neg = value_tilt.plan(ctx, params.model_copy(update={"sign": -1}))
    assert float(torch.tensor(neg.weights)[:6].mean()) < 1.0
    kept = value_tilt.plan(ctx, params.model_copy(update={"keep": 0.5}))
    assert [i for i, x in enumerate(kept.weights) if x > 0] == list(range(6))  # the filter form keeps the clean half
    # with a warm start: uniform until then, revalued in the one training loop at the warm step and every refresh
    warm = value_tilt.plan(ctx, ValueTiltParams(warm_fraction=0.5, refresh_every=1))  # 4 steps: valued at 2
    assert warm.weights == [1.0] * 12 and warm.reweigh is not None and warm.reweigh.every == 1
    state = {k: v.clone() for k, v in student.state_dict().items()}
    trained = train_student(student, enc, warm, None, AttackerConfig(kind="value_tilt"), cfg, seed=0,
                            pad_id=task_tok.pad_token_id)
    assert warm.info["valued_at_steps"] == [2, 3] and warm.weights != [1.0] * 12
    assert any(not torch.equal(state[k], v) for k, v in trained.state_dict().items())


def test_value_tilt_paper_form_is_the_adaptive_student(task_tok):
    from distillarena.attacks import value_tilt
    from distillarena.attacks.spec import PaperParams, ValueTiltParams
    from distillarena.models.presets import build_preset

    student = build_preset("tiny", task_tok, seed=0)
    problems, enc, holdout = corrupted_world(task_tok)
    ctx = make_ctx(task_tok, [(p, "") for p in problems], student=student, encoded=enc,
                   cfg=GameConfig(oracle={"n_traces": 0}), holdout=lambda source: holdout)
    a = value_tilt.plan(ctx, ValueTiltParams(form="paper", beta=1.0))
    b = value_tilt.plan_adaptive(ctx, PaperParams(beta=1.0))
    assert a.weights == pytest.approx(b.weights) and a.info["holdout_source"] == "reference"


# --- logit inversion --------------------------------------------------------------------------------------------


def sampled_world(task_tok, tiny_teacher, kind, params, *, top_k=5, decimals=None, n=6):
    """Traces of the sharpened tiny teacher under a defense, with revealed top-k rows (as ``run_traces`` writes)."""
    from distillarena.defenses.policy import build_policy
    from distillarena.defenses.reveal import RevealTopK
    from distillarena.models.presets import build_preset, load_model
    from distillarena.models.tokenizer import left_padding

    teacher = load_model(str(tiny_teacher))
    proxy = build_preset("tiny", task_tok, seed=7)
    policy = build_policy(kind, params, teacher=teacher, tokenizer=task_tok, proxy=proxy, proxy_tokenizer=task_tok)
    problems = TASK.problems("train", n, [2], seed=4)
    with left_padding(task_tok):
        enc = task_tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    res = policy.sample(teacher, enc["input_ids"], enc["attention_mask"], max_new_tokens=8,
                        generator=torch.Generator().manual_seed(0), reveal=RevealTopK(top_k, decimals=decimals),
                        eos_token_id=task_tok.eos_token_id, pad_token_id=task_tok.pad_token_id)
    texts = res.texts(task_tok)
    records = []
    for i, p in enumerate(problems):
        m = int(res.lengths[i])
        lps = res.top_logprobs[i, :m].tolist()
        if decimals is not None:
            lps = [[round(v, decimals) for v in r] for r in lps]
        records.append({"index": i, "prompt": p.prompt, "completion": texts[i], "tokens": res.tokens[i, :m].tolist(),
                        "top_ids": res.top_ids[i, :m].tolist(), "top_logprobs": lps})
    return teacher, proxy, problems, records


@pytest.mark.parametrize("kind,params,planner", [
    ("poe", {"gamma": 0.6, "temperature": 0.7}, "plan_poe"),
    ("temperature", {"temperature": 2.5}, "plan_temperature"),
])
def test_inversion_recovers_the_teachers_top_k_when_the_defense_is_known(task_tok, tiny_teacher, kind, params,
                                                                         planner):
    torch.set_num_threads(1)
    from distillarena.attacks import invert
    from distillarena.attacks.spec import InvertParams
    from distillarena.game.attack import recovered_kl

    teacher, proxy, problems, records = sampled_world(task_tok, tiny_teacher, kind, params)
    defense = DefenseConfig(kind=kind, params=params)
    ctx = make_ctx(task_tok, [(p, r["completion"]) for p, r in zip(problems, records, strict=True)], records=records,
                   defense=defense, sampling=params, load_model=lambda ref: (proxy, task_tok))
    plan = getattr(invert, planner)(ctx, InvertParams())
    assert sorted(plan.replace) == list(range(len(records))) and plan.keep == list(range(len(records)))
    kl = recovered_kl(ctx, plan, lambda: (teacher, task_tok, "t"))
    assert kl["recovered_kl"] <= 1e-4 < kl["revealed_kl"], kl  # unrounded log-probs, the proxy known: exact
    assert kl["kl_positions"] == sum(len(r["tokens"]) for r in records)
    if kind == "poe":  # undoing the temperature alone leaves the proxy's mix in
        partial = recovered_kl(ctx, invert.plan_temperature(ctx, InvertParams()), lambda: (teacher, task_tok, "t"))
        assert partial["recovered_kl"] > 100 * kl["recovered_kl"]
        with pytest.raises(UserError, match="gamma 1"):
            invert.invert_rows(torch.zeros(2, 3), temperature=1.0, gamma=1.0)


def test_inversion_with_rounded_reveals_is_approximate(task_tok, tiny_teacher):
    from distillarena.attacks import invert
    from distillarena.attacks.spec import InvertParams
    from distillarena.game.attack import recovered_kl

    params = {"gamma": 0.6, "temperature": 0.7}
    teacher, proxy, problems, records = sampled_world(task_tok, tiny_teacher, "poe", params, decimals=1)
    ctx = make_ctx(task_tok, [(p, "") for p in problems], records=records, defense=DefenseConfig(kind="poe",
                   params=params), sampling=params, load_model=lambda ref: (proxy, task_tok))
    kl = recovered_kl(ctx, invert.plan_poe(ctx, InvertParams()), lambda: (teacher, task_tok, "t"))
    assert kl["recovered_kl"] < kl["revealed_kl"]


def test_a_plan_that_replaces_text_is_trained_on_the_new_text(task_tok):
    from distillarena.attacks.plan import Replacement
    from distillarena.game.attack import apply_plan

    problems = TASK.problems("train", 2, [2], seed=5)
    ctx = make_ctx(task_tok, [(p, wrong_step(p)) for p in problems])
    plan = Plan.uniform([0, 1], replace={1: Replacement(completion=problems[1].solution())})
    enc, topk = apply_plan(ctx, plan, task_tok)
    assert enc[0] == ctx.encoded[0] and topk is None
    assert enc[1] == encode_example(task_tok, Example(prompt=problems[1].prompt, completion=problems[1].solution()))


# --------------------------------------------------------------------------------------------------------------
# In a game: budgets, skips, and the worst case
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(task_tok, tmp_path_factory):
    from distillarena.models.presets import build_preset

    root = tmp_path_factory.mktemp("attackers-models")
    paths = {}
    for name, preset, seed in (("teacher", "small", 0), ("student", "tiny", 1), ("proxy", "tiny", 2)):
        build_preset(preset, task_tok, seed=seed).save_pretrained(root / name)
        task_tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


ALL = [{"kind": "passive"}, {"kind": "value_tilt"}, {"kind": "verifier_filter"},
       {"kind": "self_consistency", "k": 3}, {"kind": "invert_temperature"}, {"kind": "invert_poe"},
       {"kind": "nll_filter"}, {"kind": "adaptive", "beta": 0.5}, {"kind": "scrub", "strength": 0.5}]


def tiny_game(models, **over):
    data = {
        "teacher": {"path": models["teacher"]}, "student": {"path": models["student"]},
        "defenses": [{"kind": "poe", "strengths": [{"gamma": 0.5}], "proxy": {"path": models["proxy"]}}],
        "attackers": ALL, "seeds": [0], "budget": 7, "prompts": {"pool": 12, "n_ops": [1, 2]}, "holdout": 4,
        "reveal": {"top_k": 3}, "max_new_tokens": 8, "batch_size": 4,
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        "eval": {"n_problems": 3, "difficulties": [1, 2], "max_new_tokens": 8, "entropy_problems": 0},
        "oracle": {"n_traces": 3, "lr": 0.01},
    }
    data.update(over)
    return GameConfig.model_validate(data)


def test_every_attacker_in_a_game_spends_no_more_than_the_budget(models, tmp_path):
    torch.set_num_threads(1)
    from distillarena.game import sweep

    cfg = tiny_game(models)
    out = tmp_path / "g"
    summary = sweep.run_game(cfg, out)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(ALL) and not any(r.get("skipped") for r in rows)
    for r in rows:
        recs = [json.loads(x) for x in (out / "traces" / r["traces_key"] / "traces.jsonl").read_text().splitlines()]
        assert r["n_queries"] == len(recs) <= cfg.budget and 0 < r["n_trained"] <= len(recs)
        if r["attacker_kind"] == "self_consistency":  # 3 samples of each of 7 // 3 prompts, same query budget
            assert len(recs) == 6 and r["n_prompts"] == 2 and r["sampled_traces"] == 6
            assert [x["prompt"] for x in recs[:3]] == [recs[0]["prompt"]] * 3
            assert r["traces"] == 7  # the teacher's utility: from the one-sample collection, as for every attacker
        else:
            assert len(recs) == 7 and r["n_prompts"] == 7
    poe_inv = [r for r in rows if r["attacker_kind"] == "invert_poe" and r["defense"] == "poe"][0]
    assert poe_inv["inverted"] == {"temperature": 0.7, "gamma": 0.5} and poe_inv["recovered_kl"] >= 0
    vt = [r for r in rows if r["attacker_kind"] == "value_tilt" and r["defense"] == "none"][0]
    assert vt["valued_at_steps"] == [1] and vt["holdout_source"] == "teacher" and vt["oracle_n"] == 3
    assert list((out / "holdout").glob("teacher-*.json"))
    # the worst case over attackers per defense setting, and who wins against it
    worst = summary["worst_case"]  # (random models learn nothing: R is undefined, and no winner is named)
    assert [w["defense_label"] for w in worst] == ["poe(gamma=0.5)"] and set(worst[0]["recoveries"]) == {
        a.label for a in cfg.attackers}
    html = (out / "report.html").read_text()
    assert "Worst case over attackers" in html and "Who wins against which defense" in html


def outcome_string(p: float, stream: int, n: int = 400) -> str:
    rng = random.Random(stream)
    return "".join("1" if rng.random() < p else "0" for _ in range(n))


def test_the_worst_case_names_the_attacker_with_the_highest_recovery_and_its_paired_lead():
    from distillarena.game.metrics import aggregate, intervals, worst_case

    base = outcome_string(0.2, 0)
    rows = []
    for att, kind, defended in (("passive", "passive", 0.40), ("strong", "verifier_filter", 0.62),
                                ("weak", "nll_filter", 0.30), ("blind", "invert_poe", None)):
        for seed in (0, 1):
            common = {"attacker": att, "attacker_kind": kind, "seed": seed}
            rows.append({**common, "defense_label": "none", "defense": "none", "params": {},
                         "undefended_reference": True, "student_correct": outcome_string(0.7, hash((att, seed)) % 997),
                         "student_accuracy": 0.7})
            cell = {**common, "defense_label": "poe(gamma=0.5)", "defense": "poe", "params": {"gamma": 0.5},
                    "teacher_accuracy": 0.5, "undefended_reference": False}
            if defended is None:
                cell.update(skipped="no log-probs", student_accuracy=None, student_correct=None)
            else:
                cell.update(student_correct=outcome_string(defended, 1000 + hash((att, seed)) % 997),
                            student_accuracy=defended)
            rows.append(cell)
    summ = aggregate(rows)
    ivs = intervals(rows, base)
    for s in summ:
        iv = ivs.get((s["defense_label"], s["attacker"]), {})
        if "recovery" in iv:
            s["recovery_ci"], s["recovery"] = iv["recovery"].as_dict(), iv["recovery"].as_dict()["mean"]
            s["recovery_unstable"] = iv["recovery"].unstable
    (w,) = worst_case(rows, summ, base)
    assert w["attacker"] == "strong" and w["runner_up"] == "passive" and w["skipped"] == ["blind"]
    assert w["skip_reasons"] == {"blind": "no log-probs"}
    lead = w["vs_passive"]["recovery_difference"]
    assert lead["ci_low"] > 0 and w["vs_passive"]["verdict"] == "yes"
    assert lead["mean"] == pytest.approx(w["recovery"] - w["passive_recovery"]["mean"])
    assert w["vs_passive"]["accuracy_difference"]["mean"] > 0.15


def test_over_http_attackers_that_need_log_probs_skip_where_the_key_reveals_none(models, tmp_path):
    torch.set_num_threads(1)
    from distillarena.game import sweep
    from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
    from distillarena.serve.testing import running_server

    serve = ServeConfig(model=models["teacher"], model_name="teacher", store=str(tmp_path / "s.sqlite"), port=0,
                        max_prompts=4, batching=BatchingConfig(max_batch_size=4, max_wait_ms=5))
    with running_server(serve) as srv:
        decoding = GameConfig().decoding
        keys = []
        for kind, params, top in (("none", {}, 0), ("temperature", {"temperature": 1.5}, 3)):
            policy = decoding.under(params)
            token, _ = srv.store.create_key(kind, policy=PolicyConfig(defense=kind, params=policy,
                                                                      max_top_logprobs=top))
            keys.append({"key": token, "defense": kind, "params": policy, "reveals_logprobs": top > 0})
        cfg = tiny_game(models, defenses=[{"kind": "temperature", "strengths": [{"temperature": 1.5}]}],
                        attackers=[{"kind": "passive"}, {"kind": "invert_temperature"}],
                        api={"base_url": srv.base_url, "model": srv.model, "keys": keys})
        out = tmp_path / "http"
        sweep.run_game(cfg, out)
    rows = {(r["defense_label"], r["attacker"]): r for r in
            (json.loads(x) for x in (out / "results.jsonl").read_text().splitlines())}
    skipped = rows[("none", "invert_temperature")]
    assert "API key of this defense reveals no top-k log-probs" in skipped["skipped"]
    assert skipped["student_accuracy"] is None and skipped["recovery_note"] == skipped["skipped"]
    assert rows[("none", "passive")].get("skipped") is None
    ran = rows[("temperature(temperature=1.5)", "invert_temperature")]
    assert ran.get("skipped") is None and ran["inverted"] == {"temperature": 1.5}
