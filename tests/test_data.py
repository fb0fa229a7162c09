import json

import pytest

from distillarena.core.errors import UserError
from distillarena.tasks.arithmetic import ArithmeticConfig
from distillarena.tasks.data import (
    IGNORE_INDEX,
    Example,
    arithmetic_examples,
    arithmetic_stream,
    collate,
    encode_example,
    load_examples,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_prompt_completion(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b", "weight": 2.0}] * 3)
    exs = load_examples(str(f))
    assert len(exs) == 3 and exs[0].prompt == "a" and exs[0].completion == "b" and exs[0].weight == 2.0


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert [e.completion for e in load_examples(str(tmp_path / "d.parquet"))] == ["c1", "c2"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [e.prompt for e in load_examples(str(tmp_path / "saved"))] == ["p1", "p2"]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_examples(str(tmp_path / "dd"), split="train")) == 2
    with pytest.raises(UserError, match="splits"):
        load_examples(str(tmp_path / "dd"), split="test")


def test_chat_messages(tmp_path, task_tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5\nAnswer: 5"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(str(f))
    ids, labels = encode_example(task_tok, ex)
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    # the completion is exactly the assistant text plus the end-of-turn token: no header, no off-by-one
    assert task_tok.decode(learned) == "2+3=5\nAnswer: 5" + task_tok.eos_token
    prompt_part = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    assert task_tok.decode(prompt_part).endswith("<|assistant|>")


def test_missing_columns_are_named(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"missing: completion"):
        load_examples(str(f))
    f2 = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match="last message must be the assistant"):
        load_examples(str(f2))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.parquet"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="cannot read dataset"):
        load_examples(str(tmp_path / "broken.jsonl"))


def test_encode_masks_prompt_and_appends_eos(task_tok):
    ex = Example(prompt="What is 2+3?\n", completion="2+3=5\nAnswer: 5")
    ids, labels = encode_example(task_tok, ex)
    n_prompt = len(task_tok(ex.prompt)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == task_tok.eos_token_id
    with pytest.raises(UserError, match="longer than the limit of 5"):
        encode_example(task_tok, ex, max_length=5)


def test_collate_right_pads(task_tok):
    exs = arithmetic_examples("train", 4, [1, 3], seed=0)
    enc = [encode_example(task_tok, e) for e in exs]
    batch = collate(enc, task_tok.pad_token_id)
    lengths = [len(i) for i, _ in enc]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_stream_uses_several_orders():
    # tiny number ranges make problems repeat, so we can see one problem drawn with different orders
    stream = arithmetic_stream([3], seed=0, config=ArithmeticConfig(add_min=1, add_max=3, mul_max=2, min_value=0))
    seen: dict[str, set[str]] = {}
    for _ in range(3000):
        e = next(stream)
        seen.setdefault(e.meta["expression"], set()).add(e.completion)
    assert any(len(v) > 1 for v in seen.values())
