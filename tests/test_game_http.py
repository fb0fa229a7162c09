"""The game played over HTTP: a real uvicorn server on 127.0.0.1 serves the teacher, one key per defense, and the
game's cells collected through the API teacher give the same traces and the same numbers as in process."""

import hashlib
import json
import typing

import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.defenses.spec import DEFENSE_KINDS
from distillarena.game.config import DefenseConfig, GameAPIKey, GameConfig, GameDefense
from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
from distillarena.serve.testing import running_server, save_tiny_model

BATCH = 4


def test_key_policies_name_defenses_as_the_game_does():
    # one table (defenses.spec): the game's defenses, the game's API keys and the server's key policies take its kinds
    for model, field in ((DefenseConfig, "kind"), (GameDefense, "kind"), (GameAPIKey, "defense"),
                         (PolicyConfig, "defense")):
        assert typing.get_args(model.model_fields[field].annotation) == DEFENSE_KINDS
    d = DefenseConfig(kind="truncation", params={"top_k": 5, "temperature": 1.5})
    assert PolicyConfig(defense=d.kind, params=d.params).label() == d.label == \
        "truncation(temperature=1.5, top_k=5)"
    # `strength` is shorthand for the main parameter; keys stored in the earlier format still load, meaning the same
    assert PolicyConfig(defense="poe", strength=0.4).params == {"gamma": 0.4}
    assert PolicyConfig.model_validate({"defense": "top_k", "strength": 5.0}) == \
        PolicyConfig(defense="truncation", params={"top_k": 5})
    assert PolicyConfig.model_validate({"defense": "temperature", "strength": None}).params == {"temperature": 2.0}
    for bad in ({"defense": "poe", "params": {"lam": 1.0}}, {"defense": "poe", "params": {"gamma": 2.0}},
                {"defense": "truncation", "strength": 3}, {"defense": "antidistillation", "params": {"method": "x"}}):
        with pytest.raises(ValueError):
            PolicyConfig.model_validate(bad)


def stops_often(path, task_tok):
    """Point the (random) model's EOS row along its mean final hidden state, so that it often ends a completion
    (p(EOS) ~ 1/6 a step) and the traces show how a stop is revealed."""
    from distillarena.models.presets import load_model

    model = load_model(str(path))
    enc = task_tok(["What is 12+30?", "What is 4*7+11?", "Compute 55-21."], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model.model(**enc).last_hidden_state[enc["attention_mask"].bool()].mean(0)
        model.lm_head.weight[task_tok.eos_token_id] = 4.0 * h / h.norm() ** 2
    model.save_pretrained(path)
    return path


def proxy_gradient(paths) -> str:
    """The proxy's holdout gradient as the in-process game computes and caches it: the server is given that file."""
    from rich.console import Console

    from distillarena.core.io import cache_dir
    from distillarena.game.collect import game_task
    from distillarena.game.traces import holdout_gradient
    from distillarena.models.fingerprint import model_fingerprint
    from distillarena.models.presets import load_model, load_tokenizer

    proxy, task = load_model(paths["proxy"]), game_task(game_config(paths))
    holdout_gradient(proxy, load_tokenizer(paths["proxy"]), HOLDOUT_TRACES, task, Console())
    problems = task.problems("holdout", HOLDOUT_TRACES, [1, 2, 3, 4], seed=0)  # its cache file, as it names it
    data_key = hashlib.sha256("\n".join(p.expression for p in problems).encode()).hexdigest()[:12]
    path = cache_dir() / "proxy_gradients" / f"{model_fingerprint(proxy)[:16]}-{data_key}.safetensors"
    assert path.is_file()
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("game-http")
    paths = {name: str(save_tiny_model(root / name, preset, seed)) for name, preset, seed in
             (("teacher", "small", 0), ("student", "tiny", 1), ("proxy", "tiny", 2))}
    stops_often(paths["teacher"], task_tok)
    cfg = ServeConfig(model=paths["teacher"], model_name="teacher", proxy=paths["proxy"], store=str(root / "s.sqlite"),
                      proxy_gradient=proxy_gradient(paths), port=0, max_prompts=BATCH,
                      batching=BatchingConfig(max_batch_size=BATCH, max_wait_ms=5))
    with running_server(cfg) as srv:
        yield paths, srv


HOLDOUT_TRACES = 8
DEFENSES_PLAYED = [
    {"kind": "poe", "strengths": [{"gamma": 0.5}]},
    {"kind": "truncation", "strengths": [{"top_k": 5, "temperature": 1.5}]},
    # the server is given the reference-solution gradient file (proxy_gradient above), so the game uses that holdout
    {"kind": "antidistillation", "strengths": [{"lam": 0.5, "temperature": 1.5}], "holdout_traces": HOLDOUT_TRACES,
     "holdout": "reference"},
]


def game_config(paths, api=None, **over):
    data = {
        "teacher": {"path": paths["teacher"]}, "student": {"path": paths["student"]},
        "defenses": [{**d, "proxy": {"path": paths["proxy"]}} for d in DEFENSES_PLAYED],
        "attackers": [{"kind": "passive"}, {"kind": "passive", "objective": "fkl", "name": "kd"}],
        "seeds": [3], "budget": 6, "prompts": {"pool": 12, "n_ops": [1, 2]}, "holdout": 4,
        "reveal": {"top_k": 3}, "max_new_tokens": 10, "batch_size": BATCH,
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0},
        "eval": {"n_problems": 3, "difficulties": [1, 2], "max_new_tokens": 10, "entropy_problems": 2},
        "oracle": {"n_traces": 0}, "api": api,
    }
    data.update(over)
    return GameConfig.model_validate(data)


def keys_for(srv, played, decoding=None):
    """One key per defense the sweep plays (the undefended one too), each with that defense laid over the game's
    decoding (temperature 0.7, top-p 0.95 by default) as its policy, as a provider would configure it."""
    decoding = GameConfig().decoding if decoding is None else decoding
    keys = []
    for kind, params in [("none", {})] + [(d["kind"], p) for d in played for p in d["strengths"]]:
        policy = decoding.under(params)
        token, _ = srv.store.create_key(kind, policy=PolicyConfig(defense=kind, params=policy, max_top_logprobs=3))
        keys.append({"key": token, "defense": kind, "params": policy})
    return keys


def rows(out):
    return {(r["defense_label"], r["attacker"]): r for r in
            (json.loads(x) for x in (out / "results.jsonl").read_text().splitlines())}


def traces(out, row):
    return [json.loads(x) for x in (out / "traces" / row["traces_key"] / "traces.jsonl").read_text().splitlines()]


SAME = ("teacher_accuracy", "teacher_step_validity", "teacher_tokens", "student_accuracy", "student_step_validity",
        "student_by_difficulty", "student_entropy", "n_trained", "base_accuracy", "reference_accuracy", "recovery")
TRACE_FIELDS = ("index", "prompt", "completion", "answer", "correct", "step_validity", "tokens", "logprobs", "top_ids",
                "top_logprobs", "defense", "params", "seed", "batch")


def test_a_sweep_over_http_gives_the_same_numbers_as_in_process(world, tmp_path):
    torch.set_num_threads(1)
    from distillarena.game import keys, sweep

    paths, srv = world
    local = game_config(paths)
    api = {"base_url": srv.base_url, "model": srv.model, "keys": keys_for(srv, DEFENSES_PLAYED)}
    remote = game_config(paths, api=api)
    assert keys.traces_key(local, keys.UNDEFENDED, 3) != keys.traces_key(remote, keys.UNDEFENDED, 3)
    before = srv.engine.batches
    sweep.run_game(local, tmp_path / "local")
    sweep.run_game(remote, tmp_path / "http")
    a, b = rows(tmp_path / "local"), rows(tmp_path / "http")
    assert set(a) == set(b) and len(a) == 8  # (none, poe, truncation, antidistillation) x (sft, fkl)
    # one request, hence one sampler call, per batch of each of the four trace collections
    assert srv.engine.batches - before == 4 * 2
    for cell in a:
        ra, rb = a[cell], b[cell]
        assert {k: ra[k] for k in SAME} == {k: rb[k] for k in SAME}, cell
        assert ra["teacher_kl"] is not None and rb["teacher_kl"] is None  # the API does not reveal it
        ta, tb = traces(tmp_path / "local", ra), traces(tmp_path / "http", rb)
        assert [{k: t[k] for k in TRACE_FIELDS} for t in ta] == [{k: t[k] for k in TRACE_FIELDS} for t in tb], cell
    # the traces are not trivial: sampled (not all alike), some stopped by the EOS, which is revealed with its top-k
    recs = traces(tmp_path / "http", b[("poe(gamma=0.5)", "passive")])
    assert len({tuple(r["tokens"]) for r in recs}) == len(recs) and len(recs[0]["top_ids"][0]) == 3
    stopped = [r for row in b.values() for r in traces(tmp_path / "http", row) if r["tokens"][-1] == 1]
    assert stopped and all(len(r["top_ids"]) == len(r["tokens"]) < 10 for r in stopped)
    # and each key applied its own defense: the same seeds sample other tokens than the undefended key's
    plain = traces(tmp_path / "http", b[("none", "passive")])
    assert [r["tokens"] for r in plain] != [r["tokens"] for r in recs]
    # the ledger labels each key's requests with its policy: the defense over the game's decoding
    labels = {row["defense"] for k in srv.store.list_keys() for row in srv.store.ledger_rows(k.id)}
    assert {"none(temperature=0.7, top_p=0.95)", "poe(gamma=0.5, temperature=0.7, top_p=0.95)",
            "truncation(temperature=1.5, top_k=5, top_p=0.95)",
            "antidistillation(lam=0.5, temperature=1.5, top_p=0.95)"} <= labels


def test_http_config_errors(world, tmp_path):
    from distillarena.game import sweep

    paths, srv = world
    with pytest.raises(ValueError, match="no key for the defenses"):  # the undefended reference needs a key too
        game_config(paths, api={"base_url": srv.base_url, "model": srv.model,
                                "keys": [k for k in keys_for(srv, DEFENSES_PLAYED) if k["defense"] != "none"]})
    with pytest.raises(ValueError, match="exactly one of key, key_env"):
        game_config(paths, api={"base_url": srv.base_url, "model": srv.model, "keys": [{"defense": "none"}]})
    # a batch larger than the server takes in one request: refused, and the error says what to change
    api = {"base_url": srv.base_url, "model": srv.model, "keys": keys_for(srv, [])}
    cfg = game_config(paths, api=api, defenses=[{"kind": "none"}], attackers=[{"kind": "passive"}],
                      batch_size=BATCH + 2)
    with pytest.raises(UserError, match="max_prompts"):
        sweep.run_game(cfg, tmp_path / "big")


def test_token_ids_extension(world):
    """``return_tokens_as_token_ids``: every generated token by id (the EOS too), in both endpoints, streamed or
    not; the text is the same as without it."""
    import openai

    _, srv = world
    token, _ = srv.store.create_key("ids", policy=PolicyConfig(max_top_logprobs=2))
    c = openai.OpenAI(base_url=srv.base_url, api_key=token, max_retries=0)
    ids = {"return_tokens_as_token_ids": True}
    kw = {"model": srv.model, "prompt": ["What is 2+3?", "7*8="], "max_tokens": 12, "logprobs": 2, "seed": 5}
    r = c.completions.create(**kw, extra_body=ids)
    plain = c.completions.create(**kw)
    assert r.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in r.choices)  # EOS included
    assert any(ch.finish_reason == "stop" for ch in r.choices)
    for ch, p in zip(r.choices, plain.choices, strict=True):
        assert ch.text == p.text and len(p.logprobs.tokens) <= len(ch.logprobs.tokens)
        assert all(t.startswith("token_id:") for t in ch.logprobs.tokens)
        assert all(k.startswith("token_id:") for alts in ch.logprobs.top_logprobs for k in alts)
        assert ch.logprobs.token_logprobs[: len(p.logprobs.tokens)] == p.logprobs.token_logprobs
    streamed: dict[int, list[str]] = {}
    for chunk in c.completions.create(**kw, extra_body=ids, stream=True):
        for ch in chunk.choices:
            streamed.setdefault(ch.index, []).extend(ch.logprobs.tokens if ch.logprobs else [])
    assert [streamed[i] for i in range(len(r.choices))] == [ch.logprobs.tokens for ch in r.choices]
    chat = c.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "What is 2+3?"}],
                                     max_tokens=12, logprobs=True, top_logprobs=2, seed=5, extra_body=ids)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(t.token.startswith("token_id:") for t in content)
