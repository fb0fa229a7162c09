"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 and a random port, the official
openai client, raw HTTP for what the client would not send."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import openai
import pytest

from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
from distillarena.serve.testing import post_raw, running_server, save_tiny_model

CAP = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("serve")
    teacher = save_tiny_model(root / "teacher", seed=0)
    proxy = save_tiny_model(root / "proxy", seed=1)
    cfg = ServeConfig(model=str(teacher), model_name="tiny-teacher", proxy=str(proxy), store=str(root / "s.sqlite"),
                      port=0, max_tokens_cap=CAP, max_n=4, batching=BatchingConfig(max_batch_size=16, max_wait_ms=20))
    with running_server(cfg) as srv:
        yield srv


def key(server, **kw):
    return server.store.create_key(kw.pop("name", "test"), **kw)


def client(server, token, **kw):
    return openai.OpenAI(base_url=server.base_url, api_key=token, max_retries=0, **kw)


def post(server, path, body, token=None, raw=None, headers=None):
    """(status, headers, parsed JSON or text) of a raw POST."""
    status, hdrs, text = post_raw(server.base_url, path, body, token, raw, headers, timeout=60)
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


CHAT = {"model": "tiny-teacher", "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 6}


def assert_error(status, body, expected, param=None):
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


# -- the official client ------------------------------------------------------------------------------------------
def test_openai_client_completes_chats_streams_and_reads_logprobs(server):
    token, rec = key(server, policy=PolicyConfig(max_top_logprobs=5))
    c = client(server, token)
    assert [m.id for m in c.models.list().data] == ["tiny-teacher"]

    r = c.completions.create(model="tiny-teacher", prompt=["What is 1+1?", "7*8="], max_tokens=5, n=2, logprobs=3,
                             seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.object == "text_completion"
    for ch in r.choices:
        assert ch.finish_reason in ("stop", "length")
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) <= 5
        assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(d) <= 3 for d in lp.top_logprobs)
    assert r.usage.completion_tokens <= 4 * 5 and r.usage.total_tokens == r.usage.prompt_tokens + \
        r.usage.completion_tokens

    kw = dict(model="tiny-teacher", messages=[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "What is 12+30?"}],
              max_tokens=10, seed=11, logprobs=True, top_logprobs=4)
    r1 = c.chat.completions.create(**kw)
    r2 = c.chat.completions.create(**kw)
    ch = r1.choices[0]
    assert r1.object == "chat.completion" and ch.message.role == "assistant"
    assert ch.message.content == r2.choices[0].message.content  # same seed, same answer
    content = ch.logprobs.content
    assert content and all(len(t.top_logprobs) == 4 for t in content)
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == ch.message.content or \
        ch.finish_reason == "stop"
    for t in content:  # top alternatives are sorted, and the chosen token's value matches its entry among them
        vals = [a.logprob for a in t.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        same = [a.logprob for a in t.top_logprobs if a.bytes == t.bytes]
        assert not same or same[0] == pytest.approx(t.logprob, abs=1e-5)

    stream = c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, lps = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
            if choice.logprobs and choice.logprobs.content:
                lps += choice.logprobs.content
    assert "".join(pieces) == ch.message.content and finish == ch.finish_reason
    assert [t.logprob for t in lps] == [t.logprob for t in content]
    assert usage.completion_tokens == r1.usage.completion_tokens


def test_stream_is_billed_and_ledgered_before_the_first_byte_and_refunded_at_the_end(server):
    token, rec = key(server)
    req = urllib.request.Request(server.base_url + "/chat/completions",
                                 data=json.dumps({**CHAT, "stream": True, "n": 2}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = r.readline()
        assert first.startswith(b"data: {")
        rows = server.store.ledger_rows(rec.id)  # committed, and the whole reservation billed, before the first byte
        assert len(rows) == 1 and rows[0]["status"] == 200 and rows[0]["stream"] == 1
        assert rows[0]["billed_tokens"] == rows[0]["reserved_tokens"] == 2 * 6
        rest = r.read().decode()
    events = [line[6:] for line in (first.decode() + rest).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    for _ in range(100):  # the refund is committed right after the last event
        row = server.store.ledger_rows(rec.id)[0]
        if row["billed_tokens"] == row["completion_tokens"]:
            break
        time.sleep(0.05)
    assert row["completion_tokens"] == row["billed_tokens"] == server.store.get_key(rec.id).tokens_used > 0


def test_stop_strings_and_greedy(server):
    token, _ = key(server)
    c = client(server, token)
    base = c.completions.create(model="tiny-teacher", prompt="What is 3+4?", max_tokens=CAP, temperature=0)
    text = base.choices[0].text
    again = c.completions.create(model="tiny-teacher", prompt="What is 3+4?", max_tokens=CAP, temperature=0)
    assert again.choices[0].text == text  # greedy is deterministic without a seed
    stop = next((ch for ch in text[2:] if ch.strip() and ch != "\ufffd"), None)
    if stop is not None:
        cut = c.completions.create(model="tiny-teacher", prompt="What is 3+4?", max_tokens=CAP, temperature=0,
                                   stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
        assert cut.usage.completion_tokens <= base.usage.completion_tokens


def test_policies_poe_rounding_and_text_only(server):
    tok_poe, rec_poe = key(server, policy=PolicyConfig(defense="poe", strength=0.5, decimals=2, max_top_logprobs=2))
    c = client(server, tok_poe)
    r = c.chat.completions.create(**{**CHAT, "max_tokens": 8}, logprobs=True, top_logprobs=2, seed=1)
    for t in r.choices[0].logprobs.content:
        for v in [t.logprob] + [a.logprob for a in t.top_logprobs]:
            assert v == round(v, 2)
    plain, _ = key(server, policy=PolicyConfig(max_top_logprobs=2))
    r_plain = client(server, plain).chat.completions.create(**{**CHAT, "max_tokens": 8}, logprobs=True,
                                                            top_logprobs=2, seed=1)
    assert [round(t.logprob, 2) for t in r_plain.choices[0].logprobs.content] != \
        [t.logprob for t in r.choices[0].logprobs.content]  # the defense changes the distribution
    assert server.store.ledger_rows(rec_poe.id)[-1]["defense"] == "poe(gamma=0.5)"

    text_only, _ = key(server, policy=PolicyConfig(logprobs=False))
    c2 = client(server, text_only)
    assert c2.chat.completions.create(**CHAT).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        c2.chat.completions.create(**CHAT, logprobs=True)
    assert e.value.code == "logprobs_not_allowed"


def test_noise_is_seeded_per_request(server):
    token, _ = key(server, policy=PolicyConfig(noise_std=0.5, max_top_logprobs=1))
    c = client(server, token)
    a = c.chat.completions.create(**CHAT, logprobs=True, top_logprobs=1, seed=5)
    b = c.chat.completions.create(**CHAT, logprobs=True, top_logprobs=1, seed=5)
    assert [t.logprob for t in a.choices[0].logprobs.content] == [t.logprob for t in b.choices[0].logprobs.content]
    clean, _ = key(server, policy=PolicyConfig(max_top_logprobs=1))
    d = client(server, clean).chat.completions.create(**CHAT, logprobs=True, top_logprobs=1, seed=5)
    assert a.choices[0].message.content == d.choices[0].message.content  # noise touches what is revealed only
    assert [t.logprob for t in a.choices[0].logprobs.content] != [t.logprob for t in d.choices[0].logprobs.content]


def test_concurrent_requests_are_batched(server):
    token, _ = key(server)
    before = server.engine.batches
    results = []

    def one(i):
        s, _, body = post(server, "/completions", {"model": "tiny-teacher", "prompt": f"What is {i}+1?",
                                                   "max_tokens": 8}, token)
        results.append(s)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    assert server.engine.batches - before < 12  # some requests shared a sampler call


# -- budgets under concurrency --------------------------------------------------------------------------------------
def test_64_requests_8_threads_4_keys_small_budgets(server):
    keys = [key(server, name=f"k{i}", max_completion_tokens=40 + 7 * i, max_requests=10) for i in range(4)]
    seen = []
    lock = threading.Lock()

    def worker(w):
        for j in range(8):
            token, rec = keys[(w + j) % 4]
            n = 1 + (w + j) % 2
            body = {"model": "tiny-teacher", "max_tokens": 3 + (w * j) % 6, "n": n}
            if j % 2:
                path, body = "/chat/completions", {**body, "messages": [{"role": "user", "content": f"{w}+{j}"}]}
            else:
                path, body = "/completions", {**body, "prompt": f"What is {w}*{j}?"}
            status, headers, resp = post(server, path, body, token)
            with lock:
                seen.append((rec.id, status, resp.get("usage", {}).get("completion_tokens", 0), headers))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 64
    statuses = Counter(s for _, s, _, _ in seen)
    assert set(statuses) <= {200, 429} and statuses[200] > 0 and statuses[429] > 0, statuses
    for s in (h for _, st, _, h in seen if st == 429):
        assert s.get("retry-after") or s.get("x-should-retry") == "false"
    for _, rec in keys:
        k = server.store.get_key(rec.id)
        rows = server.store.ledger_rows(rec.id)
        mine = [x for x in seen if x[0] == rec.id]
        assert k.tokens_used <= k.max_completion_tokens and k.requests_used <= k.max_requests
        assert k.tokens_reserved == 0 and k.requests_reserved == 0
        assert len(rows) == len(mine)
        assert Counter(r["status"] for r in rows) == Counter(s for _, s, _, _ in mine)
        served = sum(t for _, s, t, _ in mine if s == 200)
        assert k.tokens_used == served == sum(r["completion_tokens"] for r in rows)
        assert k.requests_used == sum(1 for _, s, _, _ in mine if s == 200)


def test_rate_limit_answers_429_with_retry_after(server):
    token, rec = key(server, rate_per_minute=6, burst=2)  # refills one request per 10 s: no refill mid-test
    out = [post(server, "/chat/completions", CHAT, token) for _ in range(3)]
    assert [s for s, _, _ in out] == [200, 200, 429]
    status, headers, body = out[2]
    assert_error(status, body, 429)
    assert body["error"]["code"] == "rate_limit_exceeded" and int(headers["retry-after"]) >= 1
    assert headers["x-should-retry"] == "true"
    with pytest.raises(openai.RateLimitError):
        client(server, token).chat.completions.create(**CHAT)
    assert [r["status"] for r in server.store.ledger_rows(rec.id)] == [200, 200, 429, 429]


def test_spent_budget_says_do_not_retry(server):
    token, rec = key(server, max_completion_tokens=6)
    assert post(server, "/chat/completions", {**CHAT, "max_tokens": 6}, token)[0] == 200
    status, headers, body = post(server, "/chat/completions", {**CHAT, "max_tokens": 1}, token)
    used = server.store.get_key(rec.id).tokens_used
    if used < 6:  # the first answer stopped early: what is left can still be asked for
        assert status == 200
    else:
        assert_error(status, body, 429)
        assert body["error"]["code"] == "insufficient_quota" and headers["x-should-retry"] == "false"


# -- errors ---------------------------------------------------------------------------------------------------------
def test_missing_wrong_and_revoked_keys(server):
    token, rec = key(server)
    before = server.store.ledger_count()
    rejected_before = sum(r["count"] for r in server.store.rejections())
    s, _, body = post(server, "/chat/completions", CHAT)
    assert_error(s, body, 401)
    assert body["error"]["code"] == "missing_api_key"
    s, _, body = post(server, "/chat/completions", CHAT, token[:-2] + "xy")
    assert_error(s, body, 401)
    s, _, body = post(server, "/chat/completions", CHAT, "sk-not-ours")
    assert_error(s, body, 401)
    s, _, body = post(server, "/chat/completions", CHAT, headers={"Authorization": "Basic abc"})
    assert_error(s, body, 401)
    with pytest.raises(openai.AuthenticationError):
        client(server, "da-000000000000-nope").chat.completions.create(**CHAT)
    server.store.revoke_key(rec.id)
    s, _, body = post(server, "/chat/completions", CHAT, token)
    assert_error(s, body, 403)
    with pytest.raises(openai.PermissionDeniedError):
        client(server, token).models.list()
    # a request without a valid key is counted, not written as a row of its own (a flood costs no commit each); a
    # row names a key only once the token is proven (a wrong secret could be anyone's guess of a key id)
    assert server.store.ledger_count() == before + 1
    assert [r["status"] for r in server.store.ledger_rows(rec.id)] == [403]
    # the five 401s, and the revoked key on /v1/models (not a generation endpoint: no ledger row there)
    assert sum(r["count"] for r in server.store.rejections()) == rejected_before + 6
@pytest.mark.parametrize("path,body,param", [
    ("/chat/completions", {**CHAT, "max_tokens": CAP + 1}, "max_tokens"),
    ("/chat/completions", {**CHAT, "max_completion_tokens": 10_000}, "max_completion_tokens"),
    ("/completions", {"model": "tiny-teacher", "prompt": "x" * 600, "max_tokens": 4}, "prompt"),
    ("/completions", {"model": "tiny-teacher", "prompt": "x" * 495, "max_tokens": CAP}, "max_tokens"),
    ("/completions", {"model": "tiny-teacher", "prompt": [1] * 512, "max_tokens": 1}, "prompt"),
    ("/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ("/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/completions", {"model": "tiny-teacher", "prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/chat/completions", {**CHAT, "model": "gpt-4o"}, "model"),
    ("/chat/completions", {**CHAT, "n": 5}, "n"),
    ("/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
    ("/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
    ("/chat/completions", {**CHAT, "n": True}, "n"),
    ("/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/chat/completions", {**CHAT, "stop": [""]}, "stop"),
    ("/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, None),
    ("/chat/completions", {**CHAT, "logit_bias": {"5": 100}}, "logit_bias"),
    ("/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/completions", {"model": "tiny-teacher", "prompt": [10**9], "max_tokens": 1}, "prompt"),
    ("/completions", {"model": "tiny-teacher", "prompt": [], "max_tokens": 1}, "prompt"),
    ("/chat/completions", {**CHAT, "echo": True}, "echo"),
    ("/completions", {"model": "tiny-teacher", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"model": "tiny-teacher", "prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    ("/completions", {"model": "tiny-teacher", "prompt": "hi", "prompt_logprobs": 6}, "prompt_logprobs"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/completions", {"model": "tiny-teacher", "max_tokens": 1}, "prompt"),
    ("/completions", {"model": "tiny-teacher", "prompt": "hi", "seed": 2**70}, "seed"),
])
def test_invalid_parameters_are_400(server, path, body, param):
    token, rec = key(server, policy=PolicyConfig(max_top_logprobs=5))
    status, _, resp = post(server, path, body, token)
    assert_error(status, resp, 400, param)
    rows = server.store.ledger_rows(rec.id)
    assert [r["status"] for r in rows] == [400]
    assert server.store.get_key(rec.id).tokens_used == 0


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"null", b'{"model": NaN}',
                                 b'{"model": "tiny-teacher", "messages": [{"role": "user", "content": "\\ud800"}]}',
                                 b"\xff\xfe"])
def test_malformed_bodies_are_400(server, raw):
    token, rec = key(server)
    status, _, body = post(server, "/chat/completions", None, token, raw=raw)
    assert_error(status, body, 400)
    assert [r["status"] for r in server.store.ledger_rows(rec.id)] == [400]


def test_malformed_body_without_key_is_401_and_other_errors_keep_the_shape(server):
    status, _, body = post(server, "/chat/completions", None, raw=b"{bad")
    assert_error(status, body, 401)
    token, _ = key(server)
    status, _, body = post(server, "/nowhere", {}, token)
    assert_error(status, body, 404)
    req = urllib.request.Request(server.base_url + "/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert_error(e.value.code, json.loads(e.value.read()), 405)
    conn = http.client.HTTPConnection("127.0.0.1", server.thread.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", str(9 * 2**20))  # refused from the headers, before the body is read
    conn.endheaders()
    resp = conn.getresponse()
    assert_error(resp.status, json.loads(resp.read()), 413)
    conn.close()


def test_health_and_openapi(server):
    assert post(server, "/chat/completions", CHAT, key(server)[0])[0] == 200
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["model"] == "tiny-teacher" and health["queue"] == 0
    assert health["rows"] >= health["batches"] > 0
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as r:
        spec = json.loads(r.read())
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert "HTTPBearer" in json.dumps(op["security"]) and "429" in op["responses"]
