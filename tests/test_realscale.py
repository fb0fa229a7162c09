"""The real distillation recipe's pieces (examples/distill-smollm2-real.yaml) on tiny models: the chat prompts,
greedy answers, the teacher's NLL of them, per-sequence exact KL, the before/after comparison, the KL curve; and
the bench's throughput arithmetic (bench/bench_realscale.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distillarena.core.errors import UserError
from distillarena.evaluate.answers import answer_nll, greedy_answers, sequence_divergences
from distillarena.recipes.real import (
    INSTRUCT_TEMPLATES,
    compare_students,
    instruct_prompts,
    kl_curve,
)

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_instruct_prompts_hold_out_whole_topics() -> None:
    train, held = instruct_prompts("train"), instruct_prompts("heldout")
    assert len(train) == 48 * len(INSTRUCT_TEMPLATES) and len(held) == 12 * len(INSTRUCT_TEMPLATES)
    assert len(set(train)) == len(train) and not set(train) & set(held)
    # every held-out prompt is about a topic that no training prompt mentions
    assert not any(" forests" in p or "gravity" in p for p in train)
    # any prefix of n_topics prompts uses every template
    for i, template in enumerate(INSTRUCT_TEMPLATES):
        assert held[i].startswith(template.split("{t}")[0])
    with pytest.raises(UserError, match="split"):
        instruct_prompts("test")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, task_tok):
    from distillarena.models.presets import build_preset

    root = tmp_path_factory.mktemp("pair")
    old = task_tok.chat_template
    task_tok.chat_template = CHAT
    folders = {}
    for name, seed in (("teacher", 1), ("student", 2)):
        model = build_preset("tiny", task_tok, seed=seed)
        model.save_pretrained(root / name)
        task_tok.save_pretrained(root / name)
        folders[name] = root / name
    task_tok.chat_template = old
    return folders


@torch.no_grad()
def test_answers_nll_and_divergences_against_direct_computation(pair, task_tok) -> None:
    from distillarena.models.presets import load_model

    teacher, student = load_model(str(pair["teacher"])), load_model(str(pair["student"]))
    prompts = [task_tok("12+3=", add_special_tokens=False)["input_ids"],
               task_tok("7*8=", add_special_tokens=False)["input_ids"]]
    answers = greedy_answers(student, prompts, max_new_tokens=6, eos_token_id=task_tok.eos_token_id,
                             pad_token_id=task_tok.pad_token_id, batch_size=1)
    # greedy = the argmax chain of the model's own logits, one prompt at a time
    for p, a in zip(prompts, answers, strict=True):
        seq = list(p)
        for tok_id in a:
            nxt = int(student(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            assert nxt == tok_id
            seq.append(nxt)
    nll = answer_nll(teacher, prompts, answers)
    for p, a, x in zip(prompts, answers, nll, strict=True):
        logits = teacher(input_ids=torch.tensor([list(p) + a])).logits[0, len(p) - 1:-1]
        assert x == pytest.approx(float(F.cross_entropy(logits, torch.tensor(a))), rel=1e-5)
    assert answer_nll(teacher, [[1, 2]], [[]]) == [None]

    ids = list(prompts[0]) + [5, 6, 7]
    labels = [-100] * len(prompts[0]) + [5, 6, 7]
    d = sequence_divergences(student, teacher, [(ids, labels), (ids[:3], [-100] * 3)])
    assert len(d["fkl"]) == 1 and d["positions"] == [3]  # the sequence without targets is skipped
    lq = F.log_softmax(student(input_ids=torch.tensor([ids])).logits[0, -4:-1], -1)
    lp = F.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0, -4:-1], -1)
    assert d["fkl"][0] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-5)
    assert d["rkl"][0] == pytest.approx(float((lq.exp() * (lq - lp)).sum(-1).mean()), rel=1e-5)
    same = sequence_divergences(teacher, teacher, [(ids, labels)])
    assert abs(same["fkl"][0]) < 1e-6 and abs(same["rkl"][0]) < 1e-6


def test_compare_students_pairs_every_prompt(pair, tmp_path) -> None:
    from distillarena.tasks.chat_data import chat_row, write_jsonl

    held = write_jsonl(tmp_path / "held.jsonl", [chat_row(q, a) for q, a in
                                                  (("1+2=", "3"), ("4+4=", "8"), ("9-3=", "6"), ("2*5=", "10"))])
    res = compare_students(pair["teacher"], {"before": pair["student"], "after": pair["teacher"]}, held, n=3,
                           show=2, max_new_tokens=4, teacher_dtype="float32")
    assert res["n"] == 3 and len(res["side_by_side"]) == 2
    assert set(res["side_by_side"][0]) == {"prompt", "teacher", "before", "after"}
    # the teacher as "after": zero KL, and its greedy answers are the teacher's own
    after = res["summary"]["after"]
    assert abs(after["fkl"]["mean"]) < 1e-6 and after["fkl"]["n"] == 3
    assert after["fkl_minus_before"]["mean"] < 0 and after["fkl_minus_before"]["n"] == 3
    assert [r["after"] for r in res["side_by_side"]] == [r["teacher"] for r in res["side_by_side"]]
    assert all(math.isfinite(x) for x in res["per_prompt"]["before"]["teacher_nll"])
    assert res["summary"]["reference_answers"]["teacher_nll"]["n"] == 3


def test_kl_curve_reads_tokens_seen(tmp_path) -> None:
    rows = [{"phase": "eval", "step": 0, "heldout_fkl": 9.0, "heldout_rkl": 12.0},
            {"phase": "train", "step": 5, "tokens": 500}, {"phase": "train", "step": 10, "tokens": 1100},
            {"phase": "eval", "step": 10, "heldout_fkl": 4.0, "heldout_rkl": 5.0},
            {"phase": "train", "step": 15, "tokens": 1600}, {"phase": "eval", "step": 17, "heldout_fkl": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["tokens"], r["heldout_fkl"]) for r in kl_curve(tmp_path)] == [
        (0, 0, 9.0), (10, 1100, 4.0), (17, 1600, 3.0)]


def test_bench_throughput_arithmetic() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_realscale as br

    # marks: start, then the end of each step; the warmup step is dropped
    r = br.step_times([0.0, 5.0, 7.0, 11.0], [100, 20, 40], warmup=1)
    assert r["step_s"] == [2.0, 4.0] and r["tokens"] == [20, 40] and r["tokens_per_s"] == pytest.approx(10.0)
    ratio = br.bootstrap_ratio([20.0, 22.0, 18.0], [10.0, 10.0, 10.0])
    assert ratio["mean"] == pytest.approx(2.0) and ratio["ci_low"] <= 2.0 <= ratio["ci_high"]
    run = {"cfg": {"impl": "ours", "dtype": "float32", "regime": "off"},
           "result": {"tokens": [20, 40], "step_s": [2.0, 4.0], "tokens_per_s": 10.0, "peak_rss_gb": 1.0,
                      "tokens_per_step": 30.0}}
    trl = {"cfg": {"impl": "trl_gkd", "dtype": "float32", "regime": "off"},
           "result": {"tokens": [10, 10], "step_s": [2.0, 2.0], "tokens_per_s": 5.0, "peak_rss_gb": 2.0,
                      "tokens_per_step": 10.0}}
    (row,) = br.summarize([run, trl])
    assert row["speedup_vs_trl_gkd"]["pooled"] == pytest.approx(2.0) and row["memory_vs_trl_gkd"] == 0.5
