"""The served teacher, attacked as a client would attack it: over HTTP, with any request parameters.

The property (issue 15): for every defense and reveal policy, no combination of request parameters yields samples or
revealed values closer to the undefended teacher than the policy's own output. Measured here:

- revealed values: the top-k at a fixed context (the prompt's next token) against the undefended teacher's exact
  log-probs there (max absolute error), for every accepted request, against the policy's own request (temperature 1);
- sampled distributions: inside the engine, at every step, KL(sampled || teacher) and KL(teacher || sampled) against
  the same two distances of the policy's own distribution at that context;
- refusals: a request the policy does not allow is a 400 in OpenAI's shape that names the parameter.

Each attack that once worked is a regression test below (temperature reversal, noise recomputation and averaging,
rounding scaled by a tiny temperature, the abuse limits).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillarena.serve.config import GREEDY_BELOW, BatchingConfig, PolicyConfig, ServeConfig
from distillarena.serve.testing import post_raw, running_server, save_tiny_model

K = 5
TOL = 1e-4  # the same context in another batch shape: float32 sums in another order

POLICIES = {
    "none": PolicyConfig(max_top_logprobs=K),
    "noise": PolicyConfig(noise_std=0.5, max_top_logprobs=K),
    "round": PolicyConfig(decimals=1, max_top_logprobs=K),
    "temperature2": PolicyConfig(defense="temperature", strength=2.0, max_top_logprobs=K),
    "temperature05": PolicyConfig(defense="temperature", strength=0.5, max_top_logprobs=K),
    "truncation": PolicyConfig(defense="truncation", params={"top_k": 3}, max_top_logprobs=K),
    "decoding": PolicyConfig(params={"temperature": 0.7, "top_p": 0.95}, max_top_logprobs=K),
    "poe": PolicyConfig(defense="poe", strength=0.5, max_top_logprobs=K, decimals=2),
    "antidistillation": PolicyConfig(defense="antidistillation", params={"lam": 2.0}, max_top_logprobs=K,
                                     noise_std=0.1),
    "text_only": PolicyConfig(logprobs=False),
}
TEMPERATURES = [0.0, 5e-324, 1e-6, 0.01, 0.5, 0.999, 1.0, 1.5, 2.0]
TOP_PS = [None, 0.3, 0.9, 1.0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_teacher):
    from distillarena.defenses import compute_proxy_gradient
    from distillarena.models.presets import load_model

    root = tmp_path_factory.mktemp("adversarial")
    proxy = save_tiny_model(root / "proxy", seed=1)
    ids = torch.randint(4, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    compute_proxy_gradient(load_model(str(proxy)), [{"input_ids": ids}], path=root / "g.safetensors")
    cfg = ServeConfig(model=str(tiny_teacher), model_name="teacher", proxy=str(proxy),
                      proxy_gradient=str(root / "g.safetensors"), store=str(root / "s.sqlite"), port=0,
                      max_tokens_cap=16, max_n=4, max_prompts=4, auth_failure_delay_ms=0,
                      batching=BatchingConfig(max_batch_size=16, max_wait_ms=2))
    with running_server(cfg) as srv:
        srv.keys = {name: srv.store.create_key(name, policy=p)[0] for name, p in POLICIES.items()}
        yield srv


PROMPT = "What is 12+30?"


def prompt_ids(server) -> list[int]:
    return server.engine.encode(PROMPT)


def chat_ids(server) -> list[int]:
    return server.engine.chat_prompt([{"role": "user", "content": PROMPT}])


@torch.no_grad()
def teacher_logprobs(server, ids: list[int]) -> torch.Tensor:
    """The undefended teacher's exact next-token log-probs after ``ids``."""
    return server.engine.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def post(server, path: str, body: dict, token: str | None = None, raw: bytes | None = None,
         headers: dict | None = None):
    """(status, parsed JSON, or the parsed events of a stream) of a raw POST."""
    status, _, text = post_raw(server.base_url, path, body, token, raw, headers)
    if text.startswith("data: "):
        return status, [json.loads(x[6:]) for x in text.splitlines() if x.startswith("data: {")]
    return status, json.loads(text)


def _tid(name: str) -> int:
    assert name.startswith("token_id:"), name
    return int(name.split(":", 1)[1])


def first_step(body, chat: bool, skip: int = 0) -> dict[int, float] | None:
    """The revealed alternatives of the first generated token (after ``skip`` echoed prompt tokens) of choice 0, by
    token id, from a JSON answer or the events of a stream."""
    if isinstance(body, list):  # stream events: the first event of choice 0 that carries log-probs
        for ev in body:
            for ch in ev.get("choices", []):
                if ch["index"] != 0 or not ch.get("logprobs"):
                    continue
                if chat and ch["logprobs"].get("content"):
                    return {_tid(a["token"]): a["logprob"] for a in ch["logprobs"]["content"][0]["top_logprobs"]}
                if not chat and ch["logprobs"].get("top_logprobs"):
                    return {_tid(t): v for t, v in ch["logprobs"]["top_logprobs"][0].items()}
        return None
    ch = body["choices"][0]
    if ch.get("logprobs") is None:
        return None
    if chat:
        content = ch["logprobs"]["content"]
        return {_tid(a["token"]): a["logprob"] for a in content[0]["top_logprobs"]} if content else None
    tops = ch["logprobs"]["top_logprobs"]
    return {_tid(t): v for t, v in tops[skip].items()} if len(tops) > skip else None


def error_vs_teacher(top: dict[int, float], teacher: torch.Tensor) -> float:
    """Max absolute error of revealed values (the tokens the policy does not exclude) against the teacher's."""
    errs = [abs(v - float(teacher[t])) for t, v in top.items() if v > -9999.0]
    return max(errs) if errs else math.inf


_BASELINES: dict = {}


def baseline(server, name: str, chat: bool) -> dict[int, float]:
    """The policy's own revealed alternatives at the prompt's context: temperature 1, nothing else asked."""
    key = (name, chat)
    if key not in _BASELINES:
        body = request_body(chat, {"logprobs": K})
        status, resp = post(server, "/chat/completions" if chat else "/completions", body, server.keys[name])
        assert status == 200, resp
        _BASELINES[key] = first_step(resp, chat)
    return _BASELINES[key]


def request_body(chat: bool, p: dict) -> dict:
    """A request of the adversarial parameters ``p`` (always naming tokens by id, to compare what is revealed)."""
    body: dict = {"model": "teacher", "max_tokens": p.get("max_tokens", 2), "return_tokens_as_token_ids": True}
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
        if p.get("logprobs") is not None:
            body.update(logprobs=True, top_logprobs=p["logprobs"])
    else:
        body["prompt"] = PROMPT
        if p.get("logprobs") is not None:
            body["logprobs"] = p["logprobs"]
        if p.get("echo"):
            body["echo"] = True
    for name in ("temperature", "top_p", "n", "seed", "stop", "stream"):
        if p.get(name) is not None:
            body[name] = p[name]
    return body


def allowed(policy: PolicyConfig, temperature: float | None, top_p: float | None) -> bool:
    t = 1.0 if temperature is None else temperature
    if policy.freedom == "open":
        return True
    if top_p is not None and top_p < 1.0:
        return False
    return t >= 1.0 if policy.freedom == "flatten" else t == 1.0


def check_request(server, name: str, chat: bool, p: dict) -> None:
    """One adversarial request: refused as the policy says, or revealing exactly the policy's own values."""
    policy = POLICIES[name]
    body = request_body(chat, p)
    status, resp = post(server, "/chat/completions" if chat else "/completions", body, server.keys[name])
    if not allowed(policy, p.get("temperature"), p.get("top_p")):
        assert status == 400, resp
        assert resp["error"]["code"] == "unsupported_value" and resp["error"]["param"] in ("temperature", "top_p")
        return
    if p.get("logprobs") is not None and not policy.logprobs:
        assert status == 400 and resp["error"]["code"] == "logprobs_not_allowed", resp
        return
    if p.get("stream") and p.get("echo"):
        assert status == 400 and resp["error"]["param"] == "echo", resp
        return
    assert status == 200, resp
    if p.get("logprobs") is None:
        return
    skip = len(prompt_ids(server)) if p.get("echo") else 0
    top = first_step(resp, chat, skip)
    if top is None:  # a stop string cut the first token: nothing of it is shown
        return
    own = baseline(server, name, chat)
    k = p["logprobs"]
    assert list(top) == list(own)[:k], (top, own)  # the same alternatives, in the same order
    slack = TOL + (10.0 ** -policy.decimals if policy.decimals is not None else 0.0)
    assert all(abs(top[t] - own[t]) <= slack for t in top), (top, own)
    teacher = teacher_logprobs(server, chat_ids(server) if chat else prompt_ids(server))
    own_k = dict(list(own.items())[:k])
    assert error_vs_teacher(top, teacher) >= error_vs_teacher(own_k, teacher) - slack


# -- the property, over HTTP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in POLICIES if n != "text_only"])
@pytest.mark.parametrize("chat", [False, True])
def test_every_temperature_and_top_p_is_refused_or_reveals_the_policys_own_values(server, name, chat):
    for t in TEMPERATURES:
        for top_p in TOP_PS:
            check_request(server, name, chat, {"temperature": t, "top_p": top_p, "logprobs": K, "seed": 7})


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(list(POLICIES)), chat=st.booleans(),
       temperature=st.none() | st.sampled_from(TEMPERATURES) | st.floats(0, 2, allow_nan=False),
       top_p=st.none() | st.sampled_from([0.5, 1.0]) | st.floats(0.01, 1.0),
       n=st.none() | st.integers(1, 3), seed=st.none() | st.integers(-(2**63), 2**63 - 1),
       logprobs=st.none() | st.integers(1, K), stream=st.booleans(), echo=st.booleans(),
       stop=st.none() | st.sampled_from(["1", ["+", "="], "\n"]), max_tokens=st.integers(1, 4))
def test_hypothesis_request_parameters_never_beat_the_policy(server, name, chat, temperature, top_p, n, seed, logprobs,
                                                             stream, echo, stop, max_tokens):
    check_request(server, name, chat, {"temperature": temperature, "top_p": top_p, "n": n, "seed": seed,
                                       "logprobs": logprobs, "stream": stream or None, "echo": echo and not chat,
                                       "stop": stop, "max_tokens": max_tokens})


# -- the property, inside the engine: what is sampled ----------------------------------------------------------
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of log-probs (inf where p has mass that q excludes)."""
    pp = p.exp()
    terms = torch.where(pp > 0, pp * (p - q), torch.zeros_like(p))
    return terms.sum(-1)


@pytest.mark.parametrize("name", [n for n in POLICIES if n not in ("text_only", "none", "noise", "round")])
def test_what_is_sampled_is_never_sharper_than_the_policy(server, name, monkeypatch):
    """Inside the engine, at every step of every allowed (temperature, top_p): the sampled distribution is at least
    as far from the undefended teacher as the policy's own distribution at that context, in both KL directions."""
    from distillarena.core.errors import UserError
    from distillarena.serve import engine as engine_module
    from distillarena.serve.backend import GenJob

    seen = []
    real = engine_module.sample_steps

    def recording(*args, **kwargs):
        def on_step(step):
            if step.sampled is not None and step.revealed is not None:
                m = step.active
                seen.append((step.teacher[m], step.sampled[m], step.revealed[m]))
            if kwargs_on_step is not None:
                kwargs_on_step(step)

        kwargs_on_step = kwargs.pop("on_step", None)
        return real(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(engine_module, "sample_steps", recording)
    policy = POLICIES[name]
    p = chat_ids(server)
    checked = 0
    for t in TEMPERATURES:
        for top_p in TOP_PS:
            job = GenJob([p], n=2, max_tokens=6, temperature=t, top_p=top_p, seed=1, logprobs=1, policy=policy)
            seen.clear()
            if not allowed(policy, t, top_p):
                with pytest.raises(UserError, match="fixes its sampling distribution"):
                    server.engine.generate(job, 60)
                continue
            server.engine.generate(job, 60)
            for teacher, sampled, own in seen:
                for a, b in ((sampled, teacher), (teacher, sampled)):
                    mine = _kl(a, b)
                    theirs = _kl(own, teacher) if a is sampled else _kl(teacher, own)
                    assert bool((mine >= theirs - 1e-4).all()), (name, t, top_p, mine, theirs)
            checked += 1
    assert checked >= 1


def test_greedy_is_for_undefended_keys_and_near_zero_is_greedy(server):
    c = openai.OpenAI(base_url=server.base_url, api_key=server.keys["none"], max_retries=0)
    kw = {"model": "teacher", "prompt": PROMPT, "max_tokens": 8, "logprobs": 2}
    greedy = c.completions.create(**kw, temperature=0)
    for t in (5e-324, 1e-300, GREEDY_BELOW / 2):  # vLLM's convention: below 1e-5 is greedy
        tiny = c.completions.create(**kw, temperature=t)
        assert tiny.choices[0].text == greedy.choices[0].text
        assert tiny.choices[0].logprobs.token_logprobs == greedy.choices[0].logprobs.token_logprobs
        assert all(v > -9999.0 for v in tiny.choices[0].logprobs.token_logprobs)  # the teacher's, not garbage
    for name in ("temperature2", "truncation", "poe"):  # a defended key's mode is a sharpening too
        with pytest.raises(openai.BadRequestError) as e:
            openai.OpenAI(base_url=server.base_url, api_key=server.keys[name], max_retries=0).completions.create(
                **kw, temperature=0)
        assert e.value.code == "unsupported_value" and e.value.param == "temperature"


# -- the three reversals of issue 15 ----------------------------------------------------------------------------
def test_reversal_temperature_defense_cannot_be_undone(server):
    # the attack: a key defended at tau = 2 asks for temperature 0.5 (1/tau) and gets the undefended teacher exactly
    attack = {"model": "teacher", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.5, "seed": 7, "logprobs": 5,
              "return_tokens_as_token_ids": True}
    status, resp = post(server, "/completions", attack, server.keys["temperature2"])
    assert status == 400 and resp["error"]["param"] == "temperature" and resp["error"]["code"] == "unsupported_value"
    # its mirror: a sharpening defense (tau = 0.5) flattened by temperature 2
    status, resp = post(server, "/completions", {**attack, "temperature": 2.0}, server.keys["temperature05"])
    assert status == 400 and resp["error"]["param"] == "temperature"
    # what the key does accept reveals the policy's distribution, as far from the teacher as its own
    teacher = teacher_logprobs(server, prompt_ids(server))
    own = error_vs_teacher(baseline(server, "temperature2", False), teacher)
    assert own > 0.1
    for t in (1.0, 1.5, 2.0):
        status, resp = post(server, "/completions", {**attack, "temperature": t}, server.keys["temperature2"])
        assert status == 200
        assert error_vs_teacher(first_step(resp, False), teacher) == pytest.approx(own, abs=TOL)


def _old_noise_seed(seed: int) -> int:
    """The reveal noise's seed before issue 15: sha256 of the client's own seed, no secret."""
    return int.from_bytes(hashlib.sha256(f"reveal-noise:{seed}".encode()).digest()[:8], "little") >> 1


def test_reversal_noise_can_neither_be_recomputed_nor_averaged(server):
    body = {"model": "teacher", "prompt": PROMPT, "max_tokens": 6, "logprobs": K, "seed": 3,
            "return_tokens_as_token_ids": True}
    status, noisy = post(server, "/completions", body, server.keys["noise"])
    status2, clean = post(server, "/completions", body, server.keys["none"])
    assert status == status2 == 200
    nc, cc = noisy["choices"][0]["logprobs"], clean["choices"][0]["logprobs"]
    assert nc["tokens"] == cc["tokens"]  # noise touches what is revealed, never what is sampled
    m = len(nc["tokens"])
    # the attack that worked: recompute the noise from public code and the client's own seed, subtract it
    gen = torch.Generator().manual_seed(_old_noise_seed(3))
    torch.randn(m, generator=gen)
    old = (torch.randn(m, K, generator=gen) * 0.5).tolist()
    errors = []
    for t in range(m):
        clean_row = cc["top_logprobs"][t]
        for j, (tok, v) in enumerate(nc["top_logprobs"][t].items()):
            if tok in clean_row and v > -9999.0 and v < 0.0:
                errors.append(abs(v - old[t][j] - clean_row[tok]))
    assert errors and sum(errors) / len(errors) > 0.25  # was 3e-7: now the noise is the server's secret
    # averaging: the same (context, token) gets the same noise whatever the seed, so the mean stays as far
    teacher = teacher_logprobs(server, prompt_ids(server))
    firsts = []
    for seed in range(12):
        _, resp = post(server, "/completions", {**body, "seed": seed, "max_tokens": 1}, server.keys["noise"])
        firsts.append(first_step(resp, False))
    assert all(f == firsts[0] for f in firsts)
    single = error_vs_teacher(firsts[0], teacher)
    assert single > 0.05
    # several keys with the same policy share it (a Sybil gains nothing); a key with another noise level does not
    twin, _ = server.store.create_key("twin", policy=POLICIES["noise"])
    _, resp = post(server, "/completions", {**body, "max_tokens": 1}, twin)
    assert first_step(resp, False) == firsts[0]
    other, _ = server.store.create_key("other", policy=PolicyConfig(noise_std=0.25, max_top_logprobs=K))
    _, resp = post(server, "/completions", {**body, "max_tokens": 1}, other)
    diffs = [(firsts[0][t] - v) for t, v in first_step(resp, False).items()]
    assert max(diffs) - min(diffs) > 0.05  # not a constant offset: subtracting the two cancels no noise
    # scoring the same context (echo) reveals the very same noisy values as generating at it
    ids = prompt_ids(server)
    gen_tokens = [_tid(t) for t in nc["tokens"]]
    status, scored = post(server, "/completions", {"model": "teacher", "prompt": ids + gen_tokens, "max_tokens": 0,
                                                   "echo": True, "logprobs": K, "return_tokens_as_token_ids": True},
                          server.keys["noise"])
    assert status == 200
    sc = scored["choices"][0]["logprobs"]
    assert sc["token_logprobs"][0] is None
    for t in range(m):
        assert sc["top_logprobs"][len(ids) + t] == pytest.approx(nc["top_logprobs"][t], abs=TOL)
        assert sc["token_logprobs"][len(ids) + t] == pytest.approx(nc["token_logprobs"][t], abs=TOL)


def test_reversal_rounding_is_not_scaled_by_a_tiny_temperature(server):
    teacher = teacher_logprobs(server, prompt_ids(server))
    body = {"model": "teacher", "prompt": PROMPT, "max_tokens": 1, "logprobs": 2, "return_tokens_as_token_ids": True}
    revealed = {}
    for t in (1.0, 0.01):  # at 0.01 the sampled log-probs are 100x the policy's: rounding them kept 2 more digits
        status, resp = post(server, "/completions", {**body, "temperature": t}, server.keys["round"])
        assert status == 200
        revealed[t] = first_step(resp, False)
    assert revealed[0.01] == revealed[1.0]  # the policy's values, rounded last, whatever the request's temperature
    (a, va), (b, vb) = list(revealed[1.0].items())
    assert va == round(va, 1) and vb == round(vb, 1)
    assert abs((va - vb) - float(teacher[a] - teacher[b])) <= 0.1 + TOL  # the gap is known to the rounding only


# -- abuse -------------------------------------------------------------------------------------------------------
def _raw(server, head: list[str], chunks: list[bytes] = (), timeout: float = 30.0) -> bytes:
    sock = socket.create_connection(("127.0.0.1", server.thread.port), timeout=timeout)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    for c in chunks:
        try:
            sock.sendall(c)
        except OSError:
            break
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1].strip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    finally:
        sock.close()
    return data


def test_a_body_without_a_key_is_never_read(server):
    before = server.store.ledger_count()
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
            "Transfer-Encoding: chunked"]
    answer = _raw(server, head)  # the body never comes: the answer cannot have waited for it
    assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer.lower()
    answer = _raw(server, head + ["Authorization: Bearer da-000000000000-guess"])
    assert answer.startswith(b"HTTP/1.1 401")
    assert server.store.ledger_count() == before  # counted, not one row each


def test_a_chunked_body_over_the_cap_is_413_on_the_bytes_read(server):
    token = server.keys["none"]
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
            "Transfer-Encoding: chunked", f"Authorization: Bearer {token}"]
    chunk = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n"
    answer = _raw(server, head, [chunk] * 10 + [b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 413")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large"
    rec = server.store.authenticate(token)
    assert server.store.ledger_rows(rec.id)[-1]["status"] == 413


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server, monkeypatch):
    calls = []
    real = server.engine.encode
    monkeypatch.setattr(server.engine, "encode", lambda text: calls.append(len(text)) or real(text))
    bound = server.engine.context_length * server.engine.tokens.max_bytes  # bytes a prompt can have at most
    for path, body in (("/completions", {"model": "teacher", "prompt": "1+" * 4_000_000, "max_tokens": 1}),
                       ("/completions", {"model": "teacher", "prompt": ["hi", "é" * (bound // 2 + 1)],
                                         "max_tokens": 1}),  # few enough characters, too many bytes
                       ("/chat/completions", {"model": "teacher", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "x" * 7_000_000}]})):
        status, resp = post(server, path, body, server.keys["none"])
        assert status == 400 and resp["error"]["code"] == "context_length_exceeded", resp
    assert calls == []  # not one prompt was tokenized


@pytest.mark.parametrize("raw", [b'{"model": "teacher", "prompt": "\xff\xfe"}',
                                 b'{"model": "teacher", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
                                 b"[" * 100_000 + b"]" * 100_000])
def test_unparseable_bodies_are_400_with_a_code_and_a_ledger_row(server, raw):
    name = f"parse-{len(raw)}-{raw[:3]!r}"
    token, rec = server.store.create_key(name)
    status, resp = post(server, "/completions", None, token, raw=raw)
    assert status == 400 and resp["error"]["code"] == "invalid_json" and resp["error"]["type"], resp
    assert [r["status"] for r in server.store.ledger_rows(rec.id)] == [400]
    status, resp = post(server, "/completions", None, None, raw=raw)
    assert status == 401  # without a key, the key is what is wrong


def test_keys_are_never_logged(server):
    from distillarena.serve.guard import ACCESS_LOG

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    ACCESS_LOG.addHandler(handler)
    old = ACCESS_LOG.level
    ACCESS_LOG.setLevel(logging.INFO)
    token = server.keys["none"]
    try:
        post(server, f"/completions?api_key={token}&key={token}", {"model": "teacher", "prompt": "hi",
                                                                   "max_tokens": 1}, token)
        with urllib.request.urlopen(server.url + f"/health?key={token}", timeout=10):
            pass
        for _ in range(100):  # a line is written once its answer is sent
            if any("/health" in r for r in records):
                break
            time.sleep(0.02)
    finally:
        ACCESS_LOG.removeHandler(handler)
        ACCESS_LOG.setLevel(old)
    assert any('"POST /v1/completions HTTP/1.1" 200' in r for r in records)
    assert any('"GET /health HTTP/1.1" 200' in r for r in records)
    secret = token.split("-", 2)[2]
    assert not any(secret in r or "key=" in r for r in records)


def test_keyless_requests_are_counted_not_ledgered(server):
    rows = server.store.ledger_count()
    counted = {(r["code"], r["endpoint"]): r["count"] for r in server.store.rejections()}

    def flood():
        conn = http.client.HTTPConnection("127.0.0.1", server.thread.port, timeout=30)
        for i in range(25):
            conn.request("POST", "/v1/completions", json.dumps({"model": "teacher", "prompt": "hi"}),
                         {"Authorization": f"Bearer da-{i:012x}-guess", "Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.store.ledger_count() == rows
    after = {(r["code"], r["endpoint"]): r["count"] for r in server.store.rejections()}
    key = ("invalid_api_key", "completions")
    assert after[key] - counted.get(key, 0) == 100


# -- scoring given text -------------------------------------------------------------------------------------------
def test_echo_and_prompt_logprobs_score_the_prompt_under_the_policy_and_bill_it(server):
    token, rec = server.store.create_key("scorer", policy=POLICIES["poe"])
    c = openai.OpenAI(base_url=server.base_url, api_key=token, max_retries=0)
    ids = prompt_ids(server)
    r = c.completions.create(model="teacher", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.top_logprobs[0] is None and all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # by text: may merge
    assert all(v == round(v, 2) for v in lp.token_logprobs[1:]), lp.token_logprobs  # the key's rounding
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert server.store.get_key(rec.id).tokens_used == len(ids)  # scored prompt tokens are billed
    # the scored values are the policy's (PoE), not the teacher's: the first scored token's value differs
    teacher = teacher_logprobs(server, ids[:1])
    assert abs(lp.token_logprobs[1] - float(teacher[ids[1]])) > 0.01
    # vLLM's prompt_logprobs, with a completion after it
    r = c.completions.create(model="teacher", prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 2})
    plp = r.model_extra["choices"][0]["prompt_logprobs"] if "choices" in (r.model_extra or {}) else \
        r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i, entry in enumerate(plp[1:], 1):
        assert str(ids[i]) in entry and entry[str(ids[i])]["logprob"] == pytest.approx(lp.token_logprobs[i], abs=0.011)
    with pytest.raises(openai.BadRequestError) as e:  # the key's cap on alternatives holds for scoring too
        c.completions.create(model="teacher", prompt=PROMPT, max_tokens=0, echo=True, logprobs=K + 1)
    assert e.value.code == "logprobs_not_allowed"
    text_only = openai.OpenAI(base_url=server.base_url, api_key=server.keys["text_only"], max_retries=0)
    with pytest.raises(openai.BadRequestError):
        text_only.completions.create(model="teacher", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    echoed = text_only.completions.create(model="teacher", prompt=PROMPT, max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and echoed.choices[0].logprobs is None


def test_a_budget_can_count_prompt_tokens(server):
    ids = prompt_ids(server)
    token, rec = server.store.create_key("billed", max_completion_tokens=3 * len(ids), count_prompt=True)
    c = openai.OpenAI(base_url=server.base_url, api_key=token, max_retries=0)
    r = c.completions.create(model="teacher", prompt=ids, max_tokens=2)
    k = server.store.get_key(rec.id)
    assert k.tokens_used == r.usage.prompt_tokens + r.usage.completion_tokens
    assert server.store.ledger_rows(rec.id)[-1]["billed_tokens"] == k.tokens_used
    with pytest.raises(openai.RateLimitError) as e:  # the reservation counts the prompt: 2 prompts cannot fit
        c.completions.create(model="teacher", prompt=[ids, ids], max_tokens=2)
    assert e.value.code == "insufficient_quota"
