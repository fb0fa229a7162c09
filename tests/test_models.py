import json
import subprocess
import sys

import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.models.presets import PRESETS, build_preset, count_parameters, load_model, load_tokenizer
from distillarena.models.tokenizer import train_task_tokenizer


def test_tokenizer_round_trip(task_tok):
    texts = [
        "What is the sum of 23 and 45*3?\n45*3=135\n23+135=158\nAnswer: 158",
        "What is (7+8)*(9-4)?\n",
        "arbitrary text, ünïcödé and emoji 🙂\ttabs  double  spaces",
    ]
    for t in texts:
        ids = task_tok(t)["input_ids"]
        assert task_tok.decode(ids) == t
    # every digit is its own token, so numbers are spelled digit by digit
    toks = task_tok.convert_ids_to_tokens(task_tok("12345")["input_ids"])
    assert toks == list("12345")
    assert task_tok.eos_token == "<|endoftext|>" and task_tok.pad_token_id != task_tok.eos_token_id


def test_tokenizer_training_is_deterministic(task_tok):
    again = train_task_tokenizer()
    assert again.get_vocab() == task_tok.get_vocab()


def test_tokenizer_and_model_load_without_project_code(task_tok, tmp_path):
    model = build_preset("tiny", task_tok, seed=0)
    model.save_pretrained(tmp_path)
    task_tok.save_pretrained(tmp_path)
    code = f"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
t = AutoTokenizer.from_pretrained({str(tmp_path)!r})
ids = t("What is 2+3?", return_tensors="pt")["input_ids"]
print(json.dumps({{"arch": type(m).__name__, "vocab": len(t), "sum": float(m(ids).logits.sum()),
                   "modules": sorted(k for k in sys.modules if k.startswith("distillarena"))}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert out["arch"] == "LlamaForCausalLM" and out["modules"] == []
    assert out["vocab"] == len(task_tok)
    ids = task_tok("What is 2+3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert abs(out["sum"] - float(model(ids).logits.sum())) < 1e-3 * max(1.0, abs(out["sum"]))


@pytest.mark.parametrize("name,low,high", [("tiny", 0.1e6, 0.3e6), ("small", 0.5e6, 1.0e6),
                                           ("base", 2.0e6, 3.0e6), ("large", 4e6, 6e6)])
def test_preset_parameter_counts(task_tok, name, low, high):
    model = build_preset(name, task_tok)
    n = count_parameters(model)
    assert low <= n <= high, n
    assert model.config.vocab_size == len(task_tok)
    assert model.config.eos_token_id == task_tok.eos_token_id


def test_presets_are_ordered_by_size(task_tok):
    sizes = [count_parameters(build_preset(n, task_tok)) for n in PRESETS]
    assert sizes == sorted(sizes)


def test_same_seed_same_weights(task_tok):
    a, b = build_preset("tiny", task_tok, seed=3), build_preset("tiny", task_tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_preset_and_missing_paths(task_tok, tmp_path):
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        build_preset("huge", task_tok)
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not in the local cache"):
        load_model("some-org/some-model-that-is-not-cached")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a causal LM"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
