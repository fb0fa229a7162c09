"""The API teacher against a real vLLM server (slow, opt-in): ``make vllm-teacher`` in one shell, then

    DISTILLARENA_VLLM_URL=http://127.0.0.1:8001/v1 .venv/bin/pytest -m slow tests/test_api_teacher_vllm.py

vLLM serves SmolLM2-135M-Instruct (the converted bfloat16 folder); the cache built through its ``prompt_logprobs``
and ``echo`` agrees with the same model run locally in bfloat16 (two bf16 implementations: close, not equal), and
sequence KD on its answers yields a cache a distill run trains from."""

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from rich.console import Console

URL = os.environ.get("DISTILLARENA_VLLM_URL")
MODEL_DIR = Path(os.environ.get("DISTILLARENA_VLLM_MODEL_DIR", "~/.cache/distillarena/models/"
                                "SmolLM2-135M-Instruct-bfloat16")).expanduser()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not URL, reason="set DISTILLARENA_VLLM_URL to a vLLM server (make vllm-teacher)")]
K = 20


def _rows(n):
    topics = ["the sea", "prime numbers", "a good breakfast", "rain", "chess", "bridges", "owls", "maps"]
    return [{"messages": [{"role": "user", "content": f"Write one sentence about {t}."},
                          {"role": "assistant", "content": f"Here is a sentence about {t}: it is interesting."}]}
            for t in topics[:n]]


def _config(tmp_path, mode="prompt_logprobs", **extra):
    from distillarena.train.config import DistillConfig

    src = tmp_path / "rows.jsonl"
    import json

    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(8)))
    return DistillConfig.model_validate({
        "teacher": {"api": {"base_url": URL, "model": os.environ.get("DISTILLARENA_VLLM_MODEL",
                                                                     "SmolLM2-135M-Instruct"),
                            "key_env": None, "top_logprobs": K, "mode": mode, "tokenizer": str(MODEL_DIR)}},
        "data": {"source": str(src)}, "eval": {"n_examples": 0}, "max_new_tokens": 24, **extra})


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_vllm_scores_agree_with_the_local_model(tmp_path, mode):
    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.teachers import LocalTeacher, TopKCache, build_topk_cache
    from distillarena.train.setup import api_teacher_cache

    api = TopKCache(api_teacher_cache(_config(tmp_path, mode), Accelerator(cpu=True), Console(quiet=True),
                                      out=tmp_path / "api"))
    local = LocalTeacher(load_model(str(MODEL_DIR), dtype=torch.bfloat16), load_tokenizer(str(MODEL_DIR)),
                         device="cpu")
    build_topk_cache(tmp_path / "local", local, api.examples, k=K)
    ref = TopKCache(tmp_path / "local")
    ia, la, _ = api.rows(range(len(api.examples)))
    ib, lb, _ = ref.rows(range(len(ref.examples)))
    top1 = (ia.gather(1, la.argmax(1, keepdim=True)) == ib.gather(1, lb.argmax(1, keepdim=True))).float().mean()
    assert top1 > 0.9, top1
    shared = (ia == ib).all(1)  # positions whose whole top-k set agrees (sorted ids)
    assert shared.float().mean() > 0.5
    assert (la[shared] - lb[shared]).abs().mean() < 0.1


def test_vllm_answers_feed_a_distill_run(tmp_path):
    from distillarena.recipes.distill import run_distill

    cfg = _config(tmp_path, seq_kd=True, objective="fkl",
                  student={"path": str(MODEL_DIR)},
                  train={"steps": 1, "batch_size": 2, "log_every": 1, "eval_every": 0})
    cfg.teacher.api.cache = str(tmp_path / "cache")
    res = run_distill(cfg, tmp_path / "run", console=Console(quiet=True))
    assert res.summary["steps"] == 1 and "answers" in res.summary["teacher"]
