"""The Python API: ``from distillarena import distill`` with model and dataset objects or paths; bf16 and gradient
checkpointing; push_to_hub (a mocked hub); the hub offline policy; ``trl_loss`` / ``hpd_loss`` inside TRL."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import distillarena
from distillarena.core.errors import UserError
from distillarena.models.presets import build_preset, load_model

FAST = {"train": {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 0, "lr": 1e-2},
        "eval": {"n_examples": 4, "n_problems": 0}, "logging": {"tensorboard": False}}


def rows(n=24):
    return [{"prompt": f"{i}+{i % 7}=", "completion": str(i + i % 7)} for i in range(n)]


def test_the_root_exports_the_api_lazily():
    code = "import sys, distillarena; assert 'distillarena.api' not in sys.modules; " \
           "from distillarena import distill, hpd_loss, trl_loss, DistillConfig; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError):
        distillarena.no_such_name  # noqa: B018


def test_distill_with_model_and_dataset_objects(tiny_teacher, task_tok, tmp_path):
    from datasets import Dataset

    from distillarena import distill

    teacher = load_model(str(tiny_teacher))
    student = build_preset("tiny", task_tok, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    result = distill(model=student, teacher_model=teacher, train_dataset=Dataset.from_list(rows()),
                     processing_class=task_tok, output_dir=tmp_path / "run", objective="hpd", quiet=True, **FAST)
    assert result.model is student  # trained in place, as TRL does
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert (result.student_path / "model.safetensors").is_file()
    assert "heldout_fkl" in result.summary["eval_final"]  # the held-out tail of the dataset, scored by the teacher
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "<train_dataset>" in cfg and str(tiny_teacher) in cfg  # the objects' names are recorded


def test_distill_with_paths_and_a_list_of_rows(tiny_teacher, tmp_path):
    from distillarena import distill

    res = distill(teacher_model=str(tiny_teacher), train_dataset=rows(), eval_dataset=rows(6),
                  output_dir=tmp_path / "run", student={"preset": "tiny"}, objective="fkl", quiet=True, **FAST)
    assert res.summary["steps"] == 3 and res.summary["eval_final"]["heldout_fkl"] > 0
    with pytest.raises(UserError, match=r"train.stepz: unknown field"):
        distill(teacher_model=str(tiny_teacher), train_dataset=rows(), output_dir=tmp_path / "bad",
                train={"stepz": 1})
    with pytest.raises(UserError, match="train_dataset row 0"):
        distill(teacher_model=str(tiny_teacher), train_dataset=["not a row"], output_dir=tmp_path / "bad")
    with pytest.raises(UserError, match="'prompt' and 'completion'"):
        distill(teacher_model=str(tiny_teacher), train_dataset=[{"text": "x"}], output_dir=tmp_path / "bad")


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["phase"] == "train"]


def test_bf16_and_gradient_checkpointing(tiny_teacher, tmp_path):
    from distillarena import distill

    common = {"teacher_model": str(tiny_teacher), "train_dataset": rows(), "quiet": True, "objective": "fkl", **FAST}
    distill(output_dir=tmp_path / "fp32", student={"preset": "tiny"}, **common)
    distill(output_dir=tmp_path / "gc", student={"preset": "tiny", "gradient_checkpointing": True}, **common)
    r = distill(output_dir=tmp_path / "bf16", student={"preset": "tiny", "dtype": "bfloat16"}, **common)
    fp32, gc, bf16 = (_losses(tmp_path / n) for n in ("fp32", "gc", "bf16"))
    assert gc == pytest.approx(fp32, rel=1e-6)  # recomputation changes nothing
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32  # autocast: close, not identical
    assert next(r.model.parameters()).dtype == torch.float32  # float32 master weights
    assert "dtype: bfloat16" in (tmp_path / "bf16" / "config.yaml").read_text()
    assert "gradient_checkpointing" not in (tmp_path / "fp32" / "config.yaml").read_text()  # defaults not dumped
    # on-policy sampling under autocast, with checkpointing (sampling runs in eval mode, with its KV cache)
    r = distill(output_dir=tmp_path / "onpolicy", student={"preset": "tiny", "dtype": "bfloat16",
                                                          "gradient_checkpointing": True},
                lmbda=1.0, max_new_tokens=4, **common)
    assert r.summary["steps"] == 3 and len(_losses(tmp_path / "onpolicy")) == 3


def test_push_to_hub_uploads_the_student_folder(tiny_teacher, tmp_path, monkeypatch):
    import huggingface_hub

    from distillarena import distill

    hub = tmp_path / "hub"
    calls = []

    class FakeApi:  # a local folder stands in for the hub: no network here
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=""):
            import shutil

            shutil.copytree(folder_path, hub / repo_id)
            calls.append(("upload", repo_id, commit_message))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1", "oid": "1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    kw = {"teacher_model": str(tiny_teacher), "train_dataset": rows(), "student": {"preset": "tiny"}, "quiet": True,
          "push_to_hub": {"repo_id": "me/tiny-student", "private": True}, **FAST}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):  # refused before any training
        distill(output_dir=tmp_path / "offline", **kw)
    assert not (tmp_path / "offline").exists() and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    res = distill(output_dir=tmp_path / "run", **kw)
    assert calls == [("init", "hf_test"), ("create", "me/tiny-student", True),
                     ("upload", "me/tiny-student", "Upload a student distilled with distillarena")]
    assert (hub / "me/tiny-student" / "config.json").is_file() and res.summary["hub"]["commit"] == "1"
    assert load_model(str(hub / "me/tiny-student")) is not None


def test_the_library_leaves_hf_hub_offline_to_the_user(tiny_teacher, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, time, distillarena; assert 'HF_HUB_OFFLINE' not in os.environ; "
            "from distillarena.models.presets import load_model; t = time.time(); "
            f"load_model({str(tiny_teacher)!r}); print(round(time.time() - t, 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 20  # a local folder never waits on the hub (its probe hangs ~30 s)


def test_the_command_line_defaults_offline_and_says_how_to_download(monkeypatch, capsys):
    from distillarena.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["evaluate", "no-such-org/no-such-model", "--n", "1"]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1 forbids downloading" in err and "HF_HUB_OFFLINE=0" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    main(["distill", "--set", "train.steps=x"])
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # the user's choice stands


# -- objectives inside TRL ----------------------------------------------------------------------------------------


def test_trl_loss_matches_compute_objective_and_trl_reductions():
    from distillarena import hpd_loss, trl_loss
    from distillarena.objectives import compute_objective, generalized_jsd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    jsd = trl_loss("jsd")
    for kw in ({"beta": 0.3}, {"beta": 0.3, "reduction": "sum"}, {"beta": 0.7, "num_items_in_batch": 13}):
        torch.testing.assert_close(jsd(s, t, labels, **kw), generalized_jsd_loss(s, t, labels, **kw))
    torch.manual_seed(3)
    a = hpd_loss(s, t, labels)
    torch.manual_seed(3)
    b = compute_objective("hpd", s, t, labels).mean()
    torch.testing.assert_close(a, b)
    with pytest.raises(UserError):
        trl_loss("hpd", no_such_param=1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_hpd_loss_drops_into_trl_gkd_trainer(tiny_teacher, task_tok, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillarena import hpd_loss

    called = []

    def counted(*a, **k):
        called.append(1)
        return hpd_loss(*a, **k)

    class HPDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(counted)

    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["completion"]}]} for r in rows(8)])
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                     lmbda=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, max_length=64, disable_tqdm=True)
    student = build_preset("tiny", task_tok, seed=2)
    trainer = HPDTrainer(model=student, teacher_model=load_model(str(tiny_teacher)), args=args, train_dataset=ds,
                         processing_class=task_tok)
    t0 = time.time()
    out = trainer.train()
    assert len(called) == 2 and torch.isfinite(torch.tensor(out.training_loss)) and time.time() - t0 < 60
