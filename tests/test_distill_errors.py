"""Bad input to ``distillarena distill``: one clear message, exit status 2, nothing written."""

import json

import pytest
from test_distill_support import tiny_config, write_config
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distillarena.cli import main
from distillarena.core.errors import UserError
from distillarena.models.presets import build_preset
from distillarena.teachers import check_tokenizers


def other_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["What is 12+7? 12+7=19 Answer: 19"] * 50 + ["the quick brown fox"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def foreign_student(tmp_path_factory):
    tok = other_tokenizer()
    path = tmp_path_factory.mktemp("foreign") / "student"
    build_preset("tiny", tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_expecting_error(tmp_path, capsys, cfg: dict, *extra: str, out=None) -> str:
    out = out or tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["distill", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("distillarena: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return err


def test_unknown_objective(tmp_path, capsys, tiny_teacher):
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, objective="kld"))
    assert "unknown objective 'kld'" in err and "hpd" in err
    assert not (tmp_path / "run").exists()


def test_unknown_objective_parameter(tmp_path, capsys, tiny_teacher):
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, objective="fkl",
                                                            objective_params={"alpha": 0.1}))
    assert "alpha" in err


def test_dense_objective_with_text_teacher(tmp_path, capsys):
    err = run_expecting_error(tmp_path, capsys, tiny_config(None, teacher={"text": True}, objective="fkl"))
    assert "text-only" in err and "sft" in err
    err = run_expecting_error(tmp_path, capsys, tiny_config(None, teacher={"text": True}, objective="sft",
                                                            lmbda=0.5))
    assert "on-policy" in err


def test_mismatched_tokenizers(tmp_path, capsys, tiny_teacher, foreign_student):
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, student={"path": str(foreign_student)}))
    assert "tokenizer differs" in err and "probe text tokenized differently" in err
    assert not (tmp_path / "run").exists()


def test_check_tokenizers_allows_only_a_padded_copy_with_align_vocab(task_tok):
    check_tokenizers(task_tok, task_tok)
    padded = PreTrainedTokenizerFast(tokenizer_object=task_tok.backend_tokenizer.__class__.from_str(
        task_tok.backend_tokenizer.to_str()), eos_token=task_tok.eos_token, pad_token=task_tok.pad_token)
    padded.add_tokens(["<|extra_0|>", "<|extra_1|>"])
    with pytest.raises(UserError, match="align_vocab"):
        check_tokenizers(task_tok, padded)
    check_tokenizers(task_tok, padded, align_vocab=True)
    with pytest.raises(UserError, match="tokenized differently"):
        check_tokenizers(task_tok, other_tokenizer(), align_vocab=True)


def test_empty_dataset(tmp_path, capsys, tiny_teacher):
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    cfg = tiny_config(tiny_teacher, data={"source": str(data), "train_size": 1})
    cfg["data"]["source"] = str(tmp_path / "none.jsonl")
    err = run_expecting_error(tmp_path, capsys, cfg)
    assert "does not exist" in err
    data.write_text("")
    cfg["data"]["source"] = str(data)
    err = run_expecting_error(tmp_path, capsys, cfg)
    assert "is empty" in err


def test_sequence_longer_than_context(tmp_path, capsys, tiny_teacher):
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, data={"max_length": 8}))
    assert "longer than the limit of 8" in err
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, lmbda=1.0, max_new_tokens=600))
    assert "exceeds the models' context" in err


def test_cache_for_another_teacher_or_tokenizer_or_corrupted(tmp_path, capsys, tiny_teacher,
                                                             foreign_student, task_tok):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(write_config(tmp_path / "cc.yaml", tiny_config(tiny_teacher))),
                 "--out", str(cache), "--k", "16"]) == 0
    capsys.readouterr()
    other = tmp_path / "other-teacher"
    build_preset("tiny", task_tok, seed=99).save_pretrained(other)
    task_tok.save_pretrained(other)
    base = tiny_config(None)
    del base["data"]
    err = run_expecting_error(tmp_path, capsys, {**base, "teacher": {"cache": str(cache), "path": str(other)}})
    assert "built for another teacher" in err
    err = run_expecting_error(tmp_path, capsys, {**base, "teacher": {"cache": str(cache)},
                                                 "student": {"path": str(foreign_student)}})
    assert "tokenizer differs" in err
    err = run_expecting_error(tmp_path, capsys, {**base, "teacher": {"cache": str(cache)}, "lmbda": 0.5})
    assert "live teacher" in err
    err = run_expecting_error(tmp_path, capsys, {**base, "teacher": {"cache": str(cache)}, "objective": "akl"})
    assert "cannot learn from a top-k cache" in err
    err = run_expecting_error(tmp_path, capsys, {**tiny_config(None, data={"train_size": 99}),
                                                 "teacher": {"cache": str(cache)}})
    assert "other data" in err
    shard = cache / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    err = run_expecting_error(tmp_path, capsys, {**base, "teacher": {"cache": str(cache)}})
    assert "checksum" in err
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys, tiny_teacher):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher), out=out)
    assert "already exists" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher), "--resume", out=out)
    assert "nothing to resume" in err


def test_unknown_field_names_field_and_file(tmp_path, capsys, tiny_teacher):
    err = run_expecting_error(tmp_path, capsys, tiny_config(tiny_teacher, lambda_=0.5))
    assert "lambda_: unknown field" in err and "c.yaml" in err
