"""The API teacher for ``distill``: a served teacher's top-k log-probs, asked once into the top-k cache format.

Against ``distillarena serve`` on a tiny model: the cache built through the API equals the one built from the same
model locally (scoring given data by ``prompt_logprobs`` or ``echo``, and the teacher's own answers with their
revealed top-k); a budget stops the run with a clear message and keeps what was paid for; the next run asks only
the rest (requests counted in the server's ledger); a distill run trains from it."""

import pytest
import torch
from accelerate import Accelerator
from rich.console import Console

from distillarena.core.errors import UserError
from distillarena.models.presets import load_model, load_tokenizer
from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
from distillarena.serve.testing import running_server, save_tiny_model
from distillarena.teachers import LocalTeacher, TopKCache, build_topk_cache
from distillarena.teachers.api_topk import responses_path, tail_logprob
from distillarena.train.config import DistillConfig
from distillarena.train.setup import api_teacher_cache, build_data

K = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("api-teacher")
    folder = save_tiny_model(root / "teacher")
    cfg = ServeConfig(model=str(folder), model_name="tiny", store=str(root / "s.sqlite"), port=0,
                      max_tokens_cap=32, batching=BatchingConfig(max_batch_size=8, max_wait_ms=20))
    with running_server(cfg) as srv:
        srv.folder = folder
        yield srv


def _key(server, monkeypatch, name, **kw):
    token, rec = server.store.create_key(name, policy=PolicyConfig(max_top_logprobs=20), **kw)
    monkeypatch.setenv("TEST_TEACHER_KEY", token)
    return rec


def _config(server, mode="prompt_logprobs", n=10, **api):
    return DistillConfig.model_validate({
        "teacher": {"api": {"base_url": server.base_url, "model": "tiny", "key_env": "TEST_TEACHER_KEY",
                            "top_logprobs": K, "mode": mode, "tokenizer": str(server.folder), "bits": 16,
                            "concurrency": 3, **api}},
        "data": {"train_size": n}, "student": {"preset": "tiny"}, "objective": "fkl",
        "max_new_tokens": 6, "train": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 0},
        "eval": {"n_examples": 4, "n_problems": 0}, "logging": {"tensorboard": False}})


def _requests(server, key_id):
    return sum(1 for r in server.store.ledger_rows(key_id) if r["status"] == 200)


def _local_cache(server, examples, out):
    local = LocalTeacher(load_model(str(server.folder)), load_tokenizer(str(server.folder)), device="cpu")
    build_topk_cache(out, local, examples, k=K, bits=16)
    return TopKCache(out)


def _assert_same_rows(a: TopKCache, b: TopKCache):
    assert a.examples == b.examples and a.k == b.k == K and a.vocab_size == b.vocab_size
    ia, la, ta = a.rows(range(len(a.examples)))
    ib, lb, tb = b.rows(range(len(b.examples)))
    assert ia.shape[0] > 0
    assert torch.equal(ia, ib)  # the same top-k tokens at every position
    # the server sends float32 log-probs as JSON; the 16-bit codec and the float16 tail round them further
    assert torch.allclose(la, lb, atol=2e-3), (la - lb).abs().max()
    assert torch.allclose(ta, tb, atol=2e-3), (ta - tb).abs().max()


@pytest.mark.parametrize("mode", ["prompt_logprobs", "echo"])
def test_api_cache_equals_the_local_cache_of_the_same_teacher(server, monkeypatch, tmp_path, mode):
    key = _key(server, monkeypatch, f"scorer-{mode}")
    cfg = _config(server, mode)
    folder = api_teacher_cache(cfg, Accelerator(cpu=True), Console(quiet=True), out=tmp_path / "api")
    api = TopKCache(folder)
    tok = load_tokenizer(str(server.folder))
    data = build_data(cfg, tok, 1 << 30)
    assert api.examples == [(e.ids, e.labels) for e in data.train]
    _assert_same_rows(api, _local_cache(server, api.examples, tmp_path / "local"))
    assert _requests(server, key.id) == len(api.examples)


def test_teacher_answers_with_their_revealed_topk_equal_local_scoring(server, monkeypatch, tmp_path):
    _key(server, monkeypatch, "seqkd")
    cfg = _config(server, n=6).model_copy(update={"seq_kd": True})
    api = TopKCache(api_teacher_cache(cfg, Accelerator(cpu=True), Console(quiet=True), out=tmp_path / "api"))
    assert api.manifest["meta"]["api"]["mode"] == "generate"
    prompts = build_data(cfg, load_tokenizer(str(server.folder)), 1 << 30).train
    for (ids, labels), e in zip(api.examples, prompts, strict=True):
        assert ids[:e.prompt_len] == e.ids[:e.prompt_len] and 0 < len(ids) - e.prompt_len <= 6
        assert labels[e.prompt_len:] == ids[e.prompt_len:]  # the teacher's own answer is learned
    # the top-k revealed while generating is the teacher's distribution at those positions
    _assert_same_rows(api, _local_cache(server, api.examples, tmp_path / "local"))


def test_budget_stops_keeps_what_was_paid_and_resume_asks_only_the_rest(server, monkeypatch, tmp_path):
    key = _key(server, monkeypatch, "budgeted")
    out = tmp_path / "cache"
    acc, quiet = Accelerator(cpu=True), Console(quiet=True)
    with pytest.raises(UserError, match=r"answered 4 of 10 examples.*request budget spent.*run again"):
        api_teacher_cache(_config(server, budget_requests=4, concurrency=1), acc, quiet, out=out)
    assert not (out / "manifest.json").exists() and len(responses_path(out).read_text().splitlines()) == 4
    assert _requests(server, key.id) == 4
    # the same budget counts the answers already paid: nothing more is asked
    with pytest.raises(UserError, match="answered 4 of 10"):
        api_teacher_cache(_config(server, budget_requests=4), acc, quiet, out=out)
    assert _requests(server, key.id) == 4
    # a token budget: what the server bills (prompt tokens scored + the one generated token)
    with pytest.raises(UserError, match="token budget spent"):
        api_teacher_cache(_config(server, budget_tokens=1), acc, quiet, out=out)
    api_teacher_cache(_config(server), acc, quiet, out=out)  # no budget: the 6 others
    assert _requests(server, key.id) == 10 and len(TopKCache(out).examples) == 10
    api_teacher_cache(_config(server), acc, quiet, out=out)  # complete: reused as is
    assert _requests(server, key.id) == 10


def test_a_missing_key_variable_is_named(server, monkeypatch, tmp_path):
    monkeypatch.delenv("TEST_TEACHER_KEY", raising=False)
    with pytest.raises(UserError, match="TEST_TEACHER_KEY"):
        api_teacher_cache(_config(server), Accelerator(cpu=True), Console(quiet=True), out=tmp_path / "c")


def test_config_refuses_an_api_teacher_with_another_source():
    with pytest.raises(ValueError, match="only one of"):
        DistillConfig.model_validate({"teacher": {"path": "x", "api": {"base_url": "u", "model": "m"}}})
    with pytest.raises(ValueError, match="api.cache"):
        DistillConfig.model_validate({"teacher": {"cache": "x", "api": {"base_url": "u", "model": "m"}}})
    assert "api" not in DistillConfig().model_dump()["teacher"]  # unset: older configs dump as before


def test_distill_trains_from_the_served_teacher(server, monkeypatch, tmp_path):
    from distillarena.recipes.distill import run_distill

    key = _key(server, monkeypatch, "distiller")
    cfg = _config(server, n=8)
    res = run_distill(cfg, tmp_path / "run", console=Console(quiet=True))
    assert (res.student_path / "config.json").is_file() and "API teacher tiny" in res.summary["teacher"]
    assert _requests(server, key.id) == 8
    run_distill(cfg, tmp_path / "run2", console=Console(quiet=True))  # the default cache: asked once
    assert _requests(server, key.id) == 8


def test_tail_is_the_mass_the_topk_leave():
    lps = torch.log(torch.tensor([[0.5, 0.25], [0.6, 0.4]]))
    assert torch.allclose(tail_logprob(lps).exp(), torch.tensor([0.25, 0.0]), atol=1e-6)


def test_cache_teacher_command_with_an_api_teacher_and_set(server, monkeypatch, tmp_path):
    from distillarena.cli import main
    from distillarena.core.config import dump_config

    key = _key(server, monkeypatch, "cli")
    f = tmp_path / "cfg.yaml"
    f.write_text(dump_config(_config(server, n=5)))
    assert main(["cache-teacher", str(f), "--out", str(tmp_path / "c"), "--set", "teacher.api.top_logprobs=4"]) == 0
    assert TopKCache(tmp_path / "c").k == 4 and _requests(server, key.id) == 5
    assert main(["cache-teacher", str(f), "--out", str(tmp_path / "d"), "--set", "teacher.api.top_logprobs=99"]) == 2
