"""``serve``, ``keys`` and ``ledger`` subcommands (registered on a parser the way the main CLI will)."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from distillarena.core.errors import UserError
from distillarena.serve.cli import add_serve_commands
from distillarena.serve.store import Store
from distillarena.serve.testing import save_tiny_model


def run(*argv):
    p = argparse.ArgumentParser(prog="distillarena")
    add_serve_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args([str(a) for a in argv])
    args.func(args)


def test_keys_create_list_revoke_and_ledger(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    run("keys", "create", "--store", store, "--name", "alice", "--tokens", 500, "--requests", "none",
        "--rate", 30, "--defense", "poe", "--strength", 0.25, "--top-logprobs", 2, "--decimals", 3)
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("da-") and "shown only this once" in out.err and "poe(gamma=0.25)" in out.err
    run("keys", "create", "--store", store, "--no-logprobs", "--json", "--count-prompt-tokens", "--tokens", 900)
    created = json.loads(capsys.readouterr().out)
    assert created["policy"]["logprobs"] is False and created["token"].startswith("da-")
    assert created["count_prompt"] is True and created["max_completion_tokens"] == 900
    with Store(store) as s:
        alice = s.authenticate(token)
    assert (alice.name, alice.max_completion_tokens, alice.max_requests, alice.rate_per_minute) == \
        ("alice", 500, None, 30)
    assert alice.policy.defense == "poe" and alice.policy.max_top_logprobs == 2 and alice.policy.decimals == 3

    run("keys", "list", "--store", store)
    listing = capsys.readouterr().out
    assert alice.id in listing and "active" in listing and "completion tokens 0/500" in listing
    run("keys", "revoke", "--store", store, token)  # by token, or by id
    assert "revoked" in capsys.readouterr().out
    run("keys", "list", "--store", store, "--json")
    keys = json.loads(capsys.readouterr().out)
    assert [k["revoked_at"] is not None for k in keys] == [True, False]

    with Store(store) as s:
        for i, status in enumerate([200, 429, 200]):
            s.record({"request_id": str(i), "key_id": alice.id, "time": 1000.0 + 60 * i, "endpoint": "completions",
                      "status": status, "latency_ms": 5.0, "completion_tokens": 7 if status == 200 else 0})
    run("ledger", "--store", store)
    assert "completion tokens 14" in capsys.readouterr().out
    run("ledger", "--store", store, "--csv", tmp_path / "l.csv", "--plot", tmp_path / "usage.png", "--json")
    totals = json.loads(capsys.readouterr().out)
    assert totals[0]["requests"] == 3 and totals[0]["limited"] == 1
    assert len((tmp_path / "l.csv").read_text().splitlines()) == 4
    assert (tmp_path / "usage.png").read_bytes()[:4] == b"\x89PNG"
    run("ledger", "--store", store, "--csv", "-", "--key", alice.id)
    assert capsys.readouterr().out.count("\n") == 4


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no store"):
        run("keys", "list", "--store", tmp_path / "missing.sqlite")
    with pytest.raises(UserError, match="no store"):
        run("ledger", "--store", tmp_path / "missing.sqlite")
    with pytest.raises(UserError, match="top_p must be in"):
        run("keys", "create", "--store", tmp_path / "s.sqlite", "--defense", "truncation", "--param", "top_p=3")
    with pytest.raises(UserError, match="does not take gamma"):
        run("keys", "create", "--store", tmp_path / "s.sqlite", "--defense", "truncation", "--param", "gamma=0.3")
    run("keys", "create", "--store", tmp_path / "s.sqlite")
    with pytest.raises(UserError, match="no key with id"):
        run("keys", "revoke", "--store", tmp_path / "s.sqlite", "0123456789ab")
    with pytest.raises(SystemExit):  # argparse: a budget is an integer or 'none'
        run("keys", "create", "--store", tmp_path / "s.sqlite", "--tokens", "lots")
    (tmp_path / "bad.yaml").write_text("batching:\n  max_wait: 3\n")
    with pytest.raises(UserError, match="batching.max_wait: unknown field"):
        run("keys", "list", "--config", tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="does not exist"):
        run("serve", "--model", tmp_path / "no-such-model", "--store", tmp_path / "s.sqlite")


SERVE = """
import argparse, sys
from distillarena.serve.cli import add_serve_commands
p = argparse.ArgumentParser(); add_serve_commands(p.add_subparsers(dest="command", required=True))
a = p.parse_args(sys.argv[1:]); a.func(a)
"""


def test_serve_command_runs_until_interrupted(tmp_path, task_tok):
    model = save_tiny_model(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {model}\nmodel_name: tiny\nstore: {tmp_path / 's.sqlite'}\nmax_tokens_cap: 8\n")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", str(cfg), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.1)
        assert health is not None and health["model"] == "tiny"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health?api_key=da-0123456789ab-leaked", timeout=10):
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert "serving tiny on" in out and "create one with `distillarena keys create`" in out
    assert '"GET /health HTTP/1.1" 200' in out and "leaked" not in out  # the access log drops the query string
    assert proc.returncode in (0, -signal.SIGINT)
