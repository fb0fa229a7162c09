"""``distillarena distill``: every data regime end to end on the built-in task with tiny presets, weighted SFT from a
text teacher, student initialisations, and the held-out KL going down under HPD."""

import json

import pytest
import torch
from test_distill_support import tiny_config, weights_of, write_config
from transformers import AutoModelForCausalLM

from distillarena.cli import main
from distillarena.core.io import read_jsonl
from distillarena.objectives import TeacherSignal, compute_objective
from distillarena.teachers import TextTeacher
from distillarena.train.config import DistillConfig
from distillarena.train.distill import DistillLoss, DistillStream, Encoded, Stage
from distillarena.train.setup import resolve_stages

REGIMES = {
    "off-policy": {"objective": "fkl"},
    "seq_kd": {"objective": "jsd", "seq_kd": True},
    "on-policy": {"objective": "jsd", "beta": 0.5, "lmbda": 1.0},
    "mixed": {"objective": "rkl", "lmbda": 0.5},
    "hpd": {"objective": "hpd"},
    "two-stage": {"stages": [{"steps": 2, "objective": "hpd"}, {"steps": 2, "objective": "rkl", "lmbda": 1.0}]},
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_every_regime_runs_end_to_end(regime, tiny_teacher, tmp_path, monkeypatch):
    if regime == "seq_kd":  # its own cache: other tests may have generated with this teacher and data already
        monkeypatch.setenv("DISTILLARENA_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tiny_teacher, **REGIMES[regime])
    if "stages" in cfg:
        del cfg["train"]["steps"]  # the stages' steps add up to the run's
    cfg = write_config(tmp_path / "c.yaml", cfg)
    out = tmp_path / "run"
    assert main(["distill", str(cfg), "--out", str(out)]) == 0
    # a plain Hugging Face folder: loads with no project code, tokenizer included
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2 and (out / "student" / "tokenizer.json").is_file()
    recs = read_jsonl(out / "metrics.jsonl")
    train = [r for r in recs if r["phase"] == "train"]
    evals = [r for r in recs if r["phase"] == "eval"]
    assert train and all(r["loss"] == r["loss"] for r in train)  # finite, logged every step
    assert {"heldout_fkl", "heldout_rkl", "student_entropy", "teacher_entropy", "accuracy"} <= set(evals[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_final"]["heldout_positions"] > 0
    if regime == "on-policy":
        assert all(r["on_policy_fraction"] == 1.0 for r in train)
    if regime == "two-stage":
        assert [s["objective"] for s in summary["stages"]] == ["hpd", "rkl"]
        assert [r["objective"] for r in train] == ["hpd", "hpd", "rkl", "rkl"]
        assert any(k.startswith("hpd/") for k in train[0])
    if regime == "seq_kd":
        assert summary["seq_kd_cache"]["reused"] is False
        # teacher generations are cached on disk and reused by the next run
        assert main(["distill", str(cfg), "--out", str(tmp_path / "again")]) == 0
        again = json.loads((tmp_path / "again" / "summary.json").read_text())
        assert again["seq_kd_cache"] == {**summary["seq_kd_cache"], "reused": True}
        assert all(torch.equal(a, b) for a, b in zip(weights_of(out).values(), weights_of(tmp_path / "again").values(),
                                                      strict=True))


def test_short_hpd_run_lowers_heldout_forward_kl(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, objective="hpd", data={"train_size": 128},
                      train={"steps": 30, "batch_size": 8, "lr": 3e-3, "log_every": 10, "eval_every": 15},
                      eval={"n_examples": 32, "n_problems": 0})
    out = tmp_path / "run"
    assert main(["distill", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 0
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 15, 30]
    fkl = [r["heldout_fkl"] for r in evals]
    assert fkl[-1] < 0.8 * fkl[0], fkl


def test_text_teacher_weighted_sft(tmp_path):
    rows = [{"prompt": f"What is {i}+1?\n", "completion": f"{i}+1={i + 1}\nAnswer: {i + 1}", "weight": w}
            for i, w in zip(range(40), [0.0, 1.0, 2.0, 0.5] * 10, strict=True)]
    data = tmp_path / "teacher_text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(None, teacher={"text": True}, objective="sft", data={"source": str(data)},
                      eval={"n_examples": 4, "n_problems": 0})
    out = tmp_path / "run"
    assert main(["distill", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 0
    assert (out / "student" / "model.safetensors").is_file()
    assert "heldout_fkl" not in json.loads((out / "summary.json").read_text())["eval_final"]  # no teacher model


def test_per_example_weights_scale_each_examples_loss(task_tok):
    """The weighted loss is sum_i w_i * (CE summed over example i's positions), normalised later by the count."""
    from distillarena.models.presets import build_preset
    from distillarena.tasks.data import arithmetic_examples, encode_example

    model = build_preset("tiny", task_tok, seed=0)
    exs = arithmetic_examples("train", 3, [1, 2], seed=0)
    pool = [Encoded(*encode_example(task_tok, e), weight=w) for e, w in zip(exs, [0.5, 2.0, 0.0], strict=True)]
    stage = Stage(1, 1, "sft")
    stream = DistillStream({"data": pool}, [stage], batch_size=3, grad_accum=1, pad_id=task_tok.pad_token_id)
    batch = next(stream)
    assert batch["weights"].tolist() == [pool[i].weight for i in batch["example_index"].tolist()]
    loss = DistillLoss(TextTeacher(), [stage], unwrap=lambda m: m, seed=0)(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    expected = (ce.sum(1) * batch["weights"]).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    plain = compute_objective("sft", logits, None, batch["labels"][:, 1:]).loss_sum
    assert not torch.allclose(loss, plain)


def test_student_from_teacher_layers_with_lora(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, student={"from_teacher": {"keep_every": 2}, "lora": {"r": 4}},
                      eval={"n_examples": 8, "n_problems": 0})
    out = tmp_path / "run"
    assert main(["distill", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 0
    student = AutoModelForCausalLM.from_pretrained(out / "student")  # adapters merged: a plain model
    assert student.config.num_hidden_layers == 1
    assert (out / "student-adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    # a 1-of-2-layer copy of the teacher starts much closer to it than a random student
    assert summary["eval_initial"]["heldout_fkl"] < 1.0


def test_stages_inherit_and_validate():
    cfg = DistillConfig.model_validate({"objective": "jsd", "beta": 0.3, "objective_params": {},
                                        "stages": [{"steps": 5}, {"steps": 7, "lmbda": 1.0, "beta": 0.9},
                                                   {"steps": 1, "objective": "hpd", "objective_params":
                                                    {"reinforce": False}}]})
    st = resolve_stages(cfg)
    assert [(s.first, s.last) for s in st] == [(1, 5), (6, 12), (13, 13)]
    assert [s.params for s in st] == [{"beta": 0.3}, {"beta": 0.9}, {"reinforce": False}]
    assert [s.lmbda for s in st] == [0.0, 1.0, 0.0] and cfg.total_steps == 13


def test_topk_cache_regime_end_to_end(tiny_teacher, tmp_path):
    """cache-teacher, then training from the cache (fkl on the k+1 buckets, and hpd through the cached log-probs)
    with the teacher named only for the held-out KL and the identity check."""
    cache = tmp_path / "cache"
    cfg = tiny_config(tiny_teacher)
    assert main(["cache-teacher", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(cache),
                 "--k", "64"]) == 0
    for objective, teacher in (("fkl", {"cache": str(cache)}), ("hpd", {"cache": str(cache),
                                                                        "path": str(tiny_teacher)})):
        run_cfg = tiny_config(None, teacher=teacher, objective=objective)
        del run_cfg["data"]
        out = tmp_path / f"run-{objective}"
        assert main(["distill", str(write_config(tmp_path / f"{objective}.yaml", run_cfg)), "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert "top-k cache" in summary["teacher"]
        assert ("heldout_fkl" in summary["eval_final"]) == (objective == "hpd")


def test_cache_signal_matches_the_live_teacher(tiny_teacher, tmp_path, task_tok):
    """With k = V and 16 bits, the cached top-k signal gives the same forward KL as the live dense teacher."""
    from distillarena.models.presets import build_preset, load_model
    from distillarena.tasks.data import arithmetic_examples, collate, encode_example
    from distillarena.teachers import LocalTeacher, TopKCache, build_topk_cache

    teacher = LocalTeacher(load_model(str(tiny_teacher)), task_tok)
    enc = [encode_example(task_tok, e) for e in arithmetic_examples("train", 6, [1, 2], seed=3)]
    build_topk_cache(tmp_path / "c", teacher, enc, k=10_000, bits=16, examples_per_shard=4)
    cache = TopKCache(tmp_path / "c")
    assert len(cache.manifest["shards"]) == 2 and cache.stats["kl_mean"] < 1e-5
    batch = collate(enc, task_tok.pad_token_id)
    batch["example_index"] = torch.arange(len(enc))
    student = build_preset("tiny", task_tok, seed=5)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    dense = compute_objective("fkl", logits, teacher.signal(batch), labels)
    cached = compute_objective("fkl", logits, cache.signal(batch), labels)
    assert isinstance(cache.signal(batch), TeacherSignal)
    torch.testing.assert_close(cached.loss_sum, dense.loss_sum, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["distill", "distill-two-stage", "distill-gkd", "distill-topk-cache",
                                  "distill-text-teacher"])
def test_examples_validate(name):
    from pathlib import Path

    from distillarena.core.config import load_config
    from distillarena.train.setup import check_regimes

    cfg = load_config(Path(__file__).parents[1] / "examples" / f"{name}.yaml", DistillConfig)
    check_regimes(cfg, resolve_stages(cfg))
