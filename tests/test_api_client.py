"""The attacker's API teacher against a real server: traces, retries, stopping, and resuming a killed collection."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillarena.core.errors import UserError
from distillarena.serve.config import BatchingConfig, PolicyConfig, ServeConfig
from distillarena.serve.testing import running_server, save_tiny_model
from distillarena.teachers.api_client import APITeacher, CollectionStopped, _load_done_ids, read_traces


@pytest.fixture(scope="module")
def server(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("api")
    cfg = ServeConfig(model=str(save_tiny_model(root / "teacher")), model_name="tiny", store=str(root / "s.sqlite"),
                      port=0, max_tokens_cap=32, batching=BatchingConfig(max_batch_size=8, max_wait_ms=40))
    with running_server(cfg) as srv:
        yield srv


def prompts(n):
    return [{"id": f"p{i}", "prompt": f"What is {i}+{i * 3}?"} for i in range(n)]


def test_collects_traces_with_revealed_logprobs(server, tmp_path):
    token, _ = server.store.create_key("attacker", policy=PolicyConfig(max_top_logprobs=3))
    out = tmp_path / "traces.jsonl"
    teacher = APITeacher(server.base_url, token, "tiny", max_tokens=6, top_logprobs=3, concurrency=4, seed=1)
    s = teacher.collect(prompts(6) + [{"id": "m", "messages": [{"role": "user", "content": "Hi"}]}], out)
    assert (s.total, s.written, s.skipped, s.failed, s.stopped) == (7, 7, 0, 0, None)
    recs = {r["id"]: r for r in read_traces(out)}
    assert set(recs) == {f"p{i}" for i in range(6)} | {"m"}
    ch = recs["p0"]["choices"][0]
    assert len(ch["tokens"]) == len(ch["token_bytes"]) == len(ch["token_logprobs"]) == len(ch["top_logprobs"]) > 0
    assert all(len(alts) == 3 for alts in ch["top_logprobs"]) and recs["p0"]["params"]["top_logprobs"] == 3
    assert recs["m"]["messages"][0]["content"] == "Hi" and recs["p0"]["usage"]["completion_tokens"] > 0
    # completions endpoint, text only
    plain = APITeacher(server.base_url, token, "tiny", chat=False, max_tokens=4, top_logprobs=None)
    rec = plain.query("What is 1+1?")
    assert rec["choices"][0]["tokens"] is None and isinstance(rec["choices"][0]["text"], str)
    comp = APITeacher(server.base_url, token, "tiny", chat=False, max_tokens=4, top_logprobs=2).query("1+1=")
    assert all(len(a) <= 2 for a in comp["choices"][0]["top_logprobs"])


def test_retries_rate_limits_until_answered(server, tmp_path):
    token, rec = server.store.create_key("slow", rate_per_minute=600, burst=1)  # one request per 0.1 s
    teacher = APITeacher(server.base_url, token, "tiny", max_tokens=2, top_logprobs=None, concurrency=3)
    s = teacher.collect(prompts(5), tmp_path / "t.jsonl")
    assert s.written == 5 and s.retries > 0 and s.stopped is None
    statuses = [r["status"] for r in server.store.ledger_rows(rec.id)]
    assert statuses.count(200) == 5 and statuses.count(429) == s.retries


def test_stops_when_the_budget_is_spent_and_keeps_going_on_bad_prompts(server, tmp_path):
    token, rec = server.store.create_key("poor", max_requests=4)
    out = tmp_path / "t.jsonl"
    teacher = APITeacher(server.base_url, token, "tiny", max_tokens=2, top_logprobs=None, concurrency=1)
    items = prompts(2) + [{"id": "long", "prompt": "x" * 600}] + prompts(8)[2:]
    s = teacher.collect(items, out)
    assert s.failed == 1 and s.written == 4 and "budget" in s.stopped
    assert json.loads((tmp_path / "t.jsonl.errors.jsonl").read_text())["id"] == "long"
    assert len(read_traces(out)) == 4
    with pytest.raises(CollectionStopped, match="budget"):
        teacher.query("one more")
    server.store.revoke_key(rec.id)
    with pytest.raises(CollectionStopped, match="403"):
        teacher.query("after revocation")
    with pytest.raises(UserError):
        APITeacher(server.base_url, "da-000000000000-x", "tiny", chat=False).query({"id": "x", "messages": []})


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (with retry-after-ms) twice, then a chat completion."""

    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls <= 2:
            body, status, extra = b'{"error": {"message": "busy", "type": "server_error"}}', 503, {
                "retry-after-ms": "10"}
        else:
            body, status, extra = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": "4"}}]}).encode(), 200, {}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retries_server_errors_with_backoff():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    slept = []
    try:
        teacher = APITeacher(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "k", "m", top_logprobs=None,
                             sleep=lambda s: slept.append(s))
        rec = teacher.query("2+2?")
    finally:
        httpd.shutdown()
    assert rec["choices"][0]["text"] == "4" and rec["attempts"] == 3 and slept == [0.01, 0.01]


def test_torn_last_line_is_cut_and_foreign_files_are_refused(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "cho')
    assert _load_done_ids(f) == {"a", "b"} and f.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    f.write_text("hello\n")
    with pytest.raises(UserError, match="not a trace record"):
        _load_done_ids(f)


KILLABLE = """
import sys
from distillarena.teachers.api_client import APITeacher
base, token, out = sys.argv[1:4]
items = [{"id": f"p{i}", "prompt": f"What is {i}+{i * 3}?"} for i in range(30)]
APITeacher(base, token, "tiny", max_tokens=16, top_logprobs=2, concurrency=2).collect(items, out)
"""


def test_resumes_a_killed_collection_without_duplicates_or_losses(server, tmp_path):
    token, rec = server.store.create_key("resumer", policy=PolicyConfig(max_top_logprobs=2))
    out = tmp_path / "traces.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, server.base_url, token, str(out)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = out.read_text()
    assert 3 <= before.count("\n") < 30, "the collection was not killed midway"
    kept = [json.loads(line) for line in before.splitlines() if line.endswith("}")]
    teacher = APITeacher(server.base_url, token, "tiny", max_tokens=16, top_logprobs=2, concurrency=4)
    s = teacher.collect(prompts(30), out)
    assert s.skipped == len({r["id"] for r in kept}) and s.written == 30 - s.skipped and s.stopped is None
    recs = read_traces(out)
    ids = [r["id"] for r in recs]
    assert sorted(ids) == sorted(f"p{i}" for i in range(30)) and len(set(ids)) == 30
    assert recs[: len(kept)] == kept  # what was written before the kill is untouched
    again = teacher.collect(prompts(30), out)
    assert (again.skipped, again.written) == (30, 0)
    ok = [r for r in server.store.ledger_rows(rec.id) if r["status"] == 200]
    assert len(ok) >= 30  # a request answered but not yet written when killed is asked again (never lost)
