import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# One thread: tiny models gain nothing from two, and two OpenMP threads on a busy 2-core machine are many
# times slower than one (measured while several jobs shared the machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache; the session shares one temporary cache, or the folder named by
    DISTILLARENA_TEST_CACHE (slow tests that need the trained built-in teacher can reuse it across runs)."""
    old = os.environ.get("DISTILLARENA_CACHE")
    shared = os.environ.get("DISTILLARENA_TEST_CACHE")
    os.environ["DISTILLARENA_CACHE"] = shared or str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DISTILLARENA_CACHE", None)
    else:
        os.environ["DISTILLARENA_CACHE"] = old


@pytest.fixture(scope="session")
def task_tok(_isolated_cache):
    from distillarena.models.tokenizer import task_tokenizer

    return task_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, task_tok) -> Path:
    """A random ``tiny`` preset with a sharpened output (final norm x4), saved as a plain model folder: a teacher
    with low, context-dependent entropy, built in a blink (no training)."""
    from distillarena.models.presets import build_preset

    model = build_preset("tiny", task_tok, seed=123)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    model.save_pretrained(path)
    task_tok.save_pretrained(path)
    return path
