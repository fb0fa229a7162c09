"""Output-level defenses (issue 20): each does what it claims on the built-in world's text, the game and `traces`
play them, the server applies them per key, and the user-felt utilities are measured."""

from __future__ import annotations

import json
import random

import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.defenses.policy import build_policy
from distillarena.defenses.rewrite import split_reasoning
from distillarena.defenses.spec import DEFENSES, check_defense
from distillarena.tasks.arithmetic import STEP_RE, ArithmeticTask

TASK = ArithmeticTask()
OUTPUT_KINDS = ("answer_only", "truncate_reasoning", "summary", "paraphrase", "poison", "poison_scored")


def solutions(n: int, n_ops=(2, 3, 4), seed: int = 0):
    """Problems of the built-in world and a reference chain of thought of each (random valid step order)."""
    problems = TASK.problems("train", n, list(n_ops), seed=seed)
    rng = random.Random(seed)
    return problems, [p.random_solution(rng) for p in problems]


@pytest.fixture(scope="module")
def proxy(task_tok):
    from distillarena.models.presets import build_preset

    torch.manual_seed(0)
    return build_preset("tiny", task_tok, seed=5).eval()


# --- the table ---------------------------------------------------------------------------------------------------


def test_output_kinds_are_marked_in_the_table():
    for kind in OUTPUT_KINDS:
        spec = DEFENSES[kind]
        assert spec.rewrites_text and not spec.reveals_logprobs
        assert spec.proxy_forwards_per_token({}) == 0  # a rewriting proxy does not run per teacher token
    assert DEFENSES["poe"].reveals_logprobs and not DEFENSES["poe"].rewrites_text
    assert DEFENSES["summary"].needs_proxy and DEFENSES["poison_scored"].needs_gradient
    assert not DEFENSES["answer_only"].needs_proxy and not DEFENSES["poison"].needs_proxy
    for kind, params, what in (("truncate_reasoning", {"steps": -1}, "steps"), ("truncate_reasoning",
                               {"steps": 1.5}, "steps"), ("summary", {"lines": 0}, "lines"),
                               ("paraphrase", {"strength": 1.5}, "strength"), ("poison", {"rate": -0.1}, "rate"),
                               ("poison", {"mode": "words"}, "mode"), ("answer_only", {"lines": 1}, "lines")):
        with pytest.raises(ValueError, match=what):
            check_defense(kind, params)
    check_defense("truncate_reasoning", {"steps": 2.0})  # a float from a command line is an integer here


def test_rewriting_kinds_need_the_task_and_their_models():
    with pytest.raises(UserError, match="task"):
        build_policy("answer_only", {})
    with pytest.raises(UserError, match="proxy"):
        build_policy("paraphrase", {"strength": 0.5}, task=TASK)
    policy = build_policy("answer_only", {"temperature": 0.7}, task=TASK)
    assert policy.rewrites_text and policy.processors == [] and policy.temperature == 0.7


# --- each defense does what it claims, on the built-in world's text -------------------------------------------


def test_answer_only_reveals_no_step_lines_and_keeps_the_answer():
    problems, texts = solutions(60)
    out = build_policy("answer_only", {}, task=TASK).rewrite([p.prompt for p in problems], texts, seed=0)
    for p, t, r in zip(problems, texts, out, strict=True):
        assert not any(STEP_RE.match(line) for line in r.text.split("\n"))
        assert r.text == f"Answer: {p.answer}" and TASK.check(p, r.text)
        assert r.marks["withheld_lines"] == len(split_reasoning(t, TASK)[0]) > 0
    assert build_policy("answer_only", {}, task=TASK).rewrite(["x"], ["3+4=7\n"], seed=0)[0].text == ""


def test_truncate_reasoning_keeps_the_first_steps_and_the_answer():
    problems, texts = solutions(60)
    for k in (0, 1, 2):
        out = build_policy("truncate_reasoning", {"steps": k}, task=TASK).rewrite([p.prompt for p in problems],
                                                                                   texts, seed=0)
        for p, t, r in zip(problems, texts, out, strict=True):
            reasoning, answer = split_reasoning(r.text, TASK)
            assert reasoning == split_reasoning(t, TASK)[0][:k] and TASK.check(p, r.text)


def test_summary_is_shorter_and_preserves_the_answer(proxy, task_tok):
    from distillarena.defenses.throttle import Summary

    problems, texts = solutions(40, n_ops=(3, 4))
    prompts = [p.prompt for p in problems]
    policy = build_policy("summary", {"lines": 1}, task=TASK, proxy=proxy, proxy_tokenizer=task_tok)
    out = policy.rewrite(prompts, texts, seed=0)
    surprisal = Summary(TASK, proxy, task_tok).surprisals(prompts, [split_reasoning(t, TASK)[0] for t in texts])
    for p, t, r, s in zip(problems, texts, out, surprisal, strict=True):
        assert len(r.text) < len(t) and TASK.check(p, r.text)
        reasoning, _ = split_reasoning(r.text, TASK)
        # the one line the proxy found least predictable, verbatim
        assert reasoning == [split_reasoning(t, TASK)[0][max(range(len(s)), key=lambda j: s[j])]]
    # two lines of a 4-step chain keep their order
    two = build_policy("summary", {"lines": 2}, task=TASK, proxy=proxy, proxy_tokenizer=task_tok)
    for t, r in zip(texts, two.rewrite(prompts, texts, seed=0), strict=True):
        original = split_reasoning(t, TASK)[0]
        kept = split_reasoning(r.text, TASK)[0]
        assert len(kept) == 2 and sorted(kept, key=original.index) == kept


def test_paraphrase_keeps_the_answer_and_changes_the_text(proxy, task_tok):
    from distillarena.defenses.paraphrase import paraphrase, paraphrase_lines

    problems, texts = solutions(24)
    prompts = [p.prompt for p in problems]
    full = paraphrase(prompts, texts, proxy, task_tok, strength=1.0, seed=3, task=TASK)
    assert full == paraphrase(prompts, texts, proxy, task_tok, strength=1.0, seed=3, task=TASK)  # seeded
    assert paraphrase(prompts, texts, proxy, task_tok, strength=0.0, seed=3, task=TASK) == texts
    changed = 0
    for p, t, r in zip(problems, texts, full, strict=True):
        assert TASK.check(p, r) and split_reasoning(r, TASK)[1] == split_reasoning(t, TASK)[1]
        assert len(split_reasoning(r, TASK)[0]) == len(split_reasoning(t, TASK)[0])  # one line for one line
        changed += r != t
    assert changed >= 20  # a random rewriter writes other lines
    half = paraphrase_lines(prompts, texts, proxy, task_tok, strength=0.5, seed=3, task=TASK)
    lines = sum(len(split_reasoning(t, TASK)[0]) for t in texts)
    assert 0.25 * lines < sum(k for _, k in half) < 0.75 * lines
    # the defense: the proxy as the rewriter, marks what it changed
    policy = build_policy("paraphrase", {"strength": 1.0}, task=TASK, proxy=proxy, proxy_tokenizer=task_tok)
    out = policy.rewrite(prompts, texts, seed=3)
    assert [r.text for r in out] == full and sum(r.marks["changed"] for r in out) == changed


def test_poisoning_rate_as_set_and_poisoned_answers_are_wrong():
    problems, texts = solutions(2000)
    prompts = [p.prompt for p in problems]
    for mode in ("step", "answer"):
        policy = build_policy("poison", {"rate": 0.3, "mode": mode}, task=TASK)
        out = []
        for b in range(0, len(texts), 64):  # batch by batch, as traces are collected
            out += policy.rewrite(prompts[b : b + 64], texts[b : b + 64], seed=b)
        poisoned = [r.marks["poisoned"] for r in out]
        # stochastic rounding per batch of 64: the share is 0.3 in expectation (within 4 standard errors)
        assert abs(sum(poisoned) / len(out) - 0.3) < 4 * (0.5 / 64**0.5) / (len(out) / 64) ** 0.5
        for p, t, r in zip(problems, texts, out, strict=True):
            if not r.marks["poisoned"]:
                assert r.text == t
                continue
            assert not TASK.check(p, r.text) and TASK.extract_answer(r.text) >= 0
            before, after = split_reasoning(t, TASK)[0], split_reasoning(r.text, TASK)[0]
            assert len(after) == len(before)
            if mode == "answer":
                assert after == before
            else:  # one wrong step, every other step consistent with it, the answer the chain's end
                n = len(after)
                assert TASK.step_validity(r.text) == pytest.approx((n - 1) / n)
                assert after[-1].rsplit("=", 1)[1] == str(TASK.extract_answer(r.text))
    assert not any(r.marks["poisoned"] for r in build_policy("poison", {"rate": 0.0}, task=TASK).rewrite(
        prompts[:64], texts[:64], seed=1))
    assert all(r.marks["poisoned"] for r in build_policy("poison", {"rate": 1.0}, task=TASK).rewrite(
        prompts[:64], texts[:64], seed=1))


def test_scored_poisoning_picks_the_traces_most_useful_to_a_distiller(proxy, task_tok):
    from distillarena.defenses.antidistillation import compute_proxy_gradient
    from distillarena.tasks.data import collate, encode_example, problem_example

    holdout = TASK.problems("holdout", 16, [2], seed=0)
    enc = [encode_example(task_tok, problem_example(p)) for p in holdout]
    grad = compute_proxy_gradient(proxy, [collate(enc, task_tok.pad_token_id)], tokenizer=task_tok)
    problems, texts = solutions(40, n_ops=(2,))
    prompts = [p.prompt for p in problems]
    policy = build_policy("poison_scored", {"rate": 0.25}, task=TASK, proxy=proxy, proxy_tokenizer=task_tok,
                          gradient=grad)
    out = policy.rewrite(prompts, texts, seed=0)
    scores = policy.rewrite.scores(prompts, texts)
    chosen = {i for i, r in enumerate(out) if r.marks["poisoned"]}
    assert len(chosen) == 10
    assert chosen == set(sorted(range(40), key=lambda i: scores[i])[:10])  # the lowest scores
    # the score is the directional derivative of the trace's log-likelihood along the unit holdout gradient
    from distillarena.defenses.rewrite import piece_logprobs

    i = 0
    eos = task_tok.eos_token
    d = grad.direction("unit")

    def loglik(sign):
        twin = __import__("copy").deepcopy(proxy)
        with torch.no_grad():
            for n_, p_ in twin.named_parameters():
                p_.add_(d[n_], alpha=sign * 1e-3)
        return float(piece_logprobs(twin, task_tok, [prompts[i]], [[texts[i] + eos]])[0][0].sum())

    assert scores[i] == pytest.approx((loglik(1) - loglik(-1)) / 2e-3, rel=0.05, abs=1e-3)


# --- user-felt utility --------------------------------------------------------------------------------------------


def test_checkable_reasoning():
    from distillarena.game.utility import checkable, utility_meta

    assert checkable("3*4=12\n12+5=17\nAnswer: 17", TASK)
    assert not checkable("Answer: 17", TASK)  # nothing to check
    assert not checkable("3*4=12\n12+5=18\nAnswer: 18", TASK)  # a wrong step
    assert not checkable("3*4=12\n12+5=17\nAnswer: 19", TASK)  # the chain does not reach the answer
    assert not checkable("3*4=12\n12+5=17", TASK)  # no answer
    recs = [{"completion": "3*4=12\nAnswer: 12", "answer": 12, "poisoned": False,
             "teacher_completion": "3*4=12\nAnswer: 12"},
            {"completion": "Answer: 13", "answer": 12, "poisoned": True, "teacher_completion": "Answer: 12"}]
    meta = utility_meta(recs, TASK)
    assert meta["trace_checkable"] == "10" and meta["teacher_checkable"] == 0.5
    assert meta["poisoned_fraction"] == 0.5 and meta["teacher_accuracy_before_rewrite"] == 1.0
    assert meta["teacher_reasoning_lines"] == 0.5


def test_utility_table_pairs_each_defense_with_the_undefended_teacher():
    from distillarena.game.utility import utility_table

    def row(label, seed, correct, checkable, ref=False, kl=0.1):
        return {"defense_label": label, "defense": label, "seed": seed, "undefended_reference": ref,
                "trace_correct": correct, "trace_step_validity": [float(c) for c in checkable],
                "trace_checkable": checkable, "teacher_kl": kl}

    rows = [row("none", 0, "1101", "1101", ref=True, kl=0.0), row("none", 1, "1111", "1011", ref=True, kl=0.0),
            row("answer_only", 0, "1101", "0000", kl=None), row("answer_only", 1, "1111", "0000", kl=None)]
    table = {r["defense_label"]: r for r in utility_table(rows)}
    a = table["answer_only"]
    assert a["teacher_accuracy"]["mean"] == pytest.approx(7 / 8)
    assert a["teacher_accuracy_vs_undefended"]["mean"] == 0.0  # final-answer accuracy: free
    assert a["teacher_checkable_vs_undefended"]["mean"] == pytest.approx(-6 / 8)  # what a reader loses
    assert a["teacher_checkable_vs_undefended"]["ci_high"] < 0 and a["teacher_kl"] is None
    assert "teacher_accuracy_vs_undefended" not in table["none"]


# --- played: traces, the game, the server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(task_tok, tmp_path_factory):
    from distillarena.models.presets import build_preset

    root = tmp_path_factory.mktemp("output-defenses")
    paths = {}
    for name, preset, seed in (("teacher", "small", 0), ("student", "tiny", 1), ("proxy", "tiny", 2)):
        build_preset(preset, task_tok, seed=seed).save_pretrained(root / name)
        task_tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_traces_of_an_output_defense_reveal_the_rewritten_text_alone(world, tmp_path):
    from distillarena.core.io import read_jsonl
    from distillarena.game.config import TracesConfig
    from distillarena.game.traces import run_traces

    base = {"teacher": {"path": world["teacher"]}, "prompts": {"n": 6, "n_ops": [2]}, "max_new_tokens": 12,
            "batch_size": 4}
    cfg = TracesConfig.model_validate({**base, "defense": {"kind": "truncate_reasoning", "params": {"steps": 0}},
                                       "reveal": {"top_k": 3}})  # nothing of the teacher's to reveal: ignored
    summary = run_traces(cfg, tmp_path / "t.jsonl")
    recs = read_jsonl(tmp_path / "t.jsonl")
    assert len(recs) == 6 and summary["kl_to_undefended"] is None
    for r in recs:
        assert r["logprobs"] is None and r["kl_to_undefended"] is None and "top_ids" not in r
        assert "teacher_completion" in r and split_reasoning(r["completion"], TASK)[0] == []
    # the same prompts undefended: the teacher's own texts are the ones the defense cut
    plain = TracesConfig.model_validate({**base, "defense": {"kind": "none"}})
    run_traces(plain, tmp_path / "u.jsonl")
    assert [r["teacher_completion"] for r in recs] == [r["completion"] for r in read_jsonl(tmp_path / "u.jsonl")]


def test_game_plays_output_defenses_and_reports_utility(world, tmp_path):
    from distillarena.game import sweep
    from distillarena.game.config import GameConfig

    data = {
        "teacher": {"path": world["teacher"]}, "student": {"path": world["student"]},
        "defenses": [{"kind": "answer_only"}, {"kind": "poison", "strengths": [{"rate": 0.5}]},
                     {"kind": "paraphrase", "strengths": [{"strength": 1.0}], "proxy": {"path": world["proxy"]}}],
        "attackers": [{"kind": "passive"}, {"kind": "passive", "objective": "fkl", "name": "kd"}],
        "reveal": {"top_k": 3}, "seeds": [0], "budget": 6, "prompts": {"pool": 12, "n_ops": [2]},
        "holdout": 4, "max_new_tokens": 10, "batch_size": 4, "train": {"steps": 1, "batch_size": 4,
                                                                       "warmup_steps": 0},
        "eval": {"n_problems": 3, "difficulties": [2], "max_new_tokens": 8, "entropy_problems": 0},
        "oracle": {"n_traces": 0},
    }
    cfg = GameConfig.model_validate(data)
    summary = sweep.run_game(cfg, tmp_path / "g")
    rows = [json.loads(x) for x in (tmp_path / "g" / "results.jsonl").read_text().splitlines()]
    kd = {r["defense"]: r for r in rows if r["attacker"] == "kd"}
    assert not kd["none"].get("skipped") and "rewrites the text" in kd["answer_only"]["skipped"]
    by = {r["defense"]: r for r in rows if r["attacker"] == "passive"}
    assert set(by) == {"none", "answer_only", "poison", "paraphrase"}
    assert by["answer_only"]["teacher_kl"] is None and by["none"]["teacher_kl"] is not None
    assert by["answer_only"]["teacher_checkable"] == 0.0 and by["answer_only"]["proxy_forwards_per_token"] == 0
    assert by["poison"]["poisoned_fraction"] == pytest.approx(0.5, abs=0.25)
    util = {u["defense_label"]: u for u in summary["utility"]}
    assert util["answer_only"]["teacher_checkable"]["mean"] == 0.0
    assert "teacher_accuracy_vs_undefended" in util["poison(rate=0.5)"]
    html = (tmp_path / "g" / "report.html").read_text()
    assert "Utility a legitimate user feels" in html and "checkable" in html


def test_server_applies_an_output_defense_per_key(world):
    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.serve.backend import GenJob
    from distillarena.serve.config import PolicyConfig
    from distillarena.serve.engine import Engine

    model, tok = load_model(world["teacher"]), load_tokenizer(world["teacher"])
    prompts = [p.prompt for p in TASK.problems("train", 4, [2], seed=0)]
    ids = [tok(p)["input_ids"] for p in prompts]
    with Engine(model, tok, task=TASK) as engine:
        plain = engine.generate(GenJob(prompts=ids, n=1, max_tokens=12, temperature=1.0, seed=7))
        cut = engine.generate(GenJob(prompts=ids, n=1, max_tokens=12, temperature=1.0, seed=7,
                                     policy=PolicyConfig(defense="truncate_reasoning", params={"steps": 0})))
        with pytest.raises(UserError, match="rewrites"):
            engine.generate(GenJob(prompts=ids, n=1, max_tokens=12, temperature=1.0, seed=7, logprobs=2,
                                   policy=PolicyConfig(defense="answer_only")))
    policy = build_policy("truncate_reasoning", {"steps": 0}, task=TASK)
    expected = policy.rewrite(prompts, [s.text for s in plain.sequences], seed=7)
    for s, e in zip(cut.sequences, expected, strict=True):
        assert s.text == e.text and s.logprobs is None and split_reasoning(s.text, TASK)[0] == []
        assert s.token_ids[: s.shown] == tok(e.text, add_special_tokens=False)["input_ids"]
    assert PolicyConfig(defense="answer_only").freedom == "open"
    assert PolicyConfig(defense="answer_only").rewrites_text


# --- the responding attacker ----------------------------------------------------------------------------------


def test_rationalize_replaces_answer_only_traces_with_the_students_chain_to_the_revealed_answer(monkeypatch,
                                                                                                  task_tok):
    from types import SimpleNamespace

    from distillarena.attacks import rationalize
    from distillarena.attacks.plan import AttackContext
    from distillarena.attacks.spec import RationalizeParams
    from distillarena.models.presets import build_preset

    problems, texts = solutions(6, n_ops=(2,))
    records = [{"prompt": p.prompt, "completion": f"Answer: {p.answer}"} for p in problems]
    records[5]["completion"] = texts[5]  # shows its reasoning: left as it is
    records[4]["completion"] = "no answer here"  # nothing to rationalise toward
    calls = []

    def fake_sample(model, ids, mask, **kw):  # the student: right on even attempts, wrong on odd ones
        calls.append(ids.shape[0])
        attempt = len(calls) - 1
        prompts = [task_tok.decode(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]
        by_prompt = {p.prompt: (p, t) for p, t in zip(problems, texts, strict=True)}
        out = []
        for pr in prompts:
            p, t = next(v for k, v in by_prompt.items() if pr.endswith(k.strip()) or pr.strip() == k.strip())
            out.append(t + "\nextra" if attempt % 2 == 1 or p is problems[0] else t.replace(
                f"Answer: {p.answer}", f"Answer: {p.answer + 1}"))
        return SimpleNamespace(texts=lambda tok: out)

    monkeypatch.setattr(rationalize, "sample", fake_sample)
    student = build_preset("tiny", task_tok, seed=0)
    ctx = AttackContext(records=records, encoded=[], topk=None, student=student, tokenizer=task_tok,
                        pad_id=task_tok.pad_token_id, task=TASK, problems=problems, defense=None, sampling={},
                        cfg=SimpleNamespace(max_new_tokens=16), seed=0, objective="sft", holdout=lambda s: [],
                        load_model=lambda ref: None, budget=6)
    plan = rationalize.plan(ctx, RationalizeParams(samples=2))
    assert sorted(plan.replace) == [0, 1, 2, 3] and plan.keep == list(range(6))
    for i in (0, 1, 2, 3):  # the student's chain, cut after its answer line, reaching the revealed answer
        assert plan.replace[i].completion == texts[i] and TASK.check(problems[i], plan.replace[i].completion)
    assert calls == [4, 3] and plan.info["student_samples"] == 7 and plan.info["rationalized"] == 4
    dropped = rationalize.plan(ctx, RationalizeParams(samples=1, fallback="drop"))
    assert dropped.keep == [0, 4, 5] and sorted(dropped.replace) == [0]


def test_served_key_with_an_output_defense_over_http(tmp_path, task_tok):
    from distillarena.serve.config import PolicyConfig, ServeConfig
    from distillarena.serve.testing import post_raw, running_server, save_tiny_model

    teacher = save_tiny_model(tmp_path / "teacher", seed=0)
    cfg = ServeConfig(model=str(teacher), model_name="t", store=str(tmp_path / "s.sqlite"), port=0,
                      max_tokens_cap=16)
    prompt = TASK.problems("train", 1, [2], seed=0)[0].prompt
    with running_server(cfg) as srv:
        token, _ = srv.store.create_key("a", policy=PolicyConfig(defense="answer_only"))

        def post(body):
            status, _, text = post_raw(srv.base_url, "/completions", {"model": "t", "prompt": prompt,
                                                                        "max_tokens": 12, **body}, token, timeout=60)
            return status, json.loads(text)

        status, body = post({"seed": 3})
        assert status == 200
        text = body["choices"][0]["text"]
        assert split_reasoning(text, TASK)[0] == [] and not any(STEP_RE.match(x) for x in text.split("\n"))
        for extra, param in (({"logprobs": 2}, "logprobs"), ({"stream": True}, "stream")):
            status, body = post(extra)
            assert status == 400 and body["error"]["param"] == param and "rewrites" in body["error"]["message"]


def test_output_defenses_over_http_give_the_traces_of_the_in_process_game(world, tmp_path):
    """A served key applies its output-level defense with the request's seed: the game over HTTP collects the same
    rewritten texts as in process (paraphrase: the same proxy rewrites with the same seed)."""
    from rich.console import Console

    from distillarena.core.io import read_jsonl
    from distillarena.game import sweep
    from distillarena.game.config import GameConfig
    from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
    from distillarena.serve.testing import running_server

    played = [("answer_only", {}), ("paraphrase", {"strength": 1.0})]
    data = {"teacher": {"path": world["teacher"]}, "student": {"path": world["student"]},
            "defenses": [{"kind": k, "strengths": [p], "proxy": {"path": world["proxy"]}} for k, p in played],
            "attackers": [{"kind": "passive"}], "seeds": [2], "budget": 6, "prompts": {"pool": 12, "n_ops": [2]},
            "holdout": 4, "max_new_tokens": 10, "batch_size": 4, "train": {"steps": 1, "batch_size": 4,
                                                                           "warmup_steps": 0},
            "eval": {"n_problems": 2, "difficulties": [2], "max_new_tokens": 8, "entropy_problems": 0},
            "oracle": {"n_traces": 0}}
    local = GameConfig.model_validate(data)
    serve = ServeConfig(model=world["teacher"], model_name="teacher", proxy=world["proxy"], port=0, max_prompts=4,
                        store=str(tmp_path / "s.sqlite"), batching=BatchingConfig(max_batch_size=4, max_wait_ms=5))
    with running_server(serve) as srv:
        keys = []
        for kind, params in [("none", {})] + played:
            policy = local.decoding.under(params)
            token, _ = srv.store.create_key(kind, policy=PolicyConfig(defense=kind, params=policy))
            keys.append({"key": token, "defense": kind, "params": policy})
        remote = GameConfig.model_validate({**data, "api": {"base_url": srv.base_url, "model": srv.model,
                                                            "keys": keys}})
        game = sweep.Game(remote, tmp_path / "http", Console())
        got = {kind: read_jsonl(game.traces(remote.defenses[i].at(params), 2)[0] / "traces.jsonl")
               for i, (kind, params) in enumerate(played)}
    mine = sweep.Game(local, tmp_path / "local", Console())
    for i, (kind, params) in enumerate(played):
        expected = read_jsonl(mine.traces(local.defenses[i].at(params), 2)[0] / "traces.jsonl")
        assert [r["completion"] for r in got[kind]] == [r["completion"] for r in expected], kind
    # a rewriting key reveals text only (no log-probs, hence no token ids): the game re-encodes the text, which gives
    # the in-process tokens wherever the text reads back as it was written (a random model's bytes need not)
    assert [r["tokens"] for r in got["answer_only"]] == [r["tokens"] for r in read_jsonl(
        mine.traces(local.defenses[0].at({}), 2)[0] / "traces.jsonl")]
