"""The key store, budgets, rate limits and ledger (no model, no HTTP)."""

import io
import sqlite3
import threading

import pytest

from distillarena.core.errors import UserError
from distillarena.serve.config import PolicyConfig, ServeConfig
from distillarena.serve.store import Rejected, Store
from distillarena.serve.testing import FAST_KDF


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.sqlite", kdf=FAST_KDF) as s:
        yield s


def test_tokens_are_stored_only_as_salted_hashes(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:  # the default (slow) scrypt parameters, once
        token, rec = s.create_key("alice")
        token2, rec2 = s.create_key("bob")
        assert token.startswith(f"da-{rec.id}-") and rec.id != rec2.id
        assert s.authenticate(token).id == rec.id
        assert s.authenticate(token).id == rec.id  # the second time from the in-memory cache
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    secret = token.split("-", 2)[2]
    assert secret.encode() not in blob and token.encode() not in blob
    rows = sqlite3.connect(path).execute("SELECT salt, hash, kdf FROM keys").fetchall()
    assert rows[0][0] != rows[1][0] and rows[0][2].startswith("scrypt:16384:")


def test_authentication_failures(store):
    token, rec = store.create_key("a")
    for bad, code in [(None, "missing_api_key"), ("", "missing_api_key"), ("sk-123", "invalid_api_key"),
                      (token[:-1] + ("A" if token[-1] != "A" else "B"), "invalid_api_key"),
                      (f"da-{'0' * 12}-secret", "invalid_api_key"), ("da-zz-x", "invalid_api_key")]:
        with pytest.raises(Rejected) as e:
            store.authenticate(bad)
        assert e.value.status == 401 and e.value.code == code
    store.revoke_key(rec.id)
    with pytest.raises(Rejected) as e:
        store.authenticate(token)
    assert e.value.status == 403 and e.value.key.id == rec.id
    with pytest.raises(Rejected) as e:
        store.reserve(rec.id, 1)
    assert e.value.status == 403
    with pytest.raises(UserError, match="no key"):
        store.revoke_key("0" * 12)


def test_policy_is_copied_into_the_key(store):
    policy = PolicyConfig(defense="poe", strength=0.3, max_top_logprobs=2, decimals=1)
    _, rec = store.create_key("p", policy=policy)
    assert store.get_key(rec.id).policy == policy
    assert rec.policy.label() == "poe(gamma=0.3)"
    _, rec2 = store.create_key("d")
    assert rec2.policy == PolicyConfig()


def test_budget_is_exact_and_refusals_say_why(store):
    _, rec = store.create_key("b", max_completion_tokens=10, max_requests=3)
    r1 = store.reserve(rec.id, 6)
    with pytest.raises(Rejected) as e:  # 6 reserved + 6 > 10, but 0 used + 6 <= 10: wait for the one in flight
        store.reserve(rec.id, 6)
    assert e.value.status == 429 and e.value.code == "budget_reserved" and e.value.retry_after
    store.settle(r1, completion_tokens=4, prompt_tokens=3)
    r2 = store.reserve(rec.id, 6)
    store.settle(r2, completion_tokens=6, prompt_tokens=3)
    k = store.get_key(rec.id)
    assert (k.tokens_used, k.tokens_reserved, k.requests_used, k.prompt_tokens_used) == (10, 0, 2, 6)
    with pytest.raises(Rejected) as e:
        store.reserve(rec.id, 1)
    assert e.value.code == "insufficient_quota" and e.value.should_retry is False and e.value.retry_after is None
    r3 = store.reserve(rec.id, 0)  # a request that reserves no token still counts against the request budget
    store.settle(r3, completion_tokens=0, prompt_tokens=0, used=False)  # a failed request: refunded
    assert store.get_key(rec.id).requests_used == 2
    with pytest.raises(ValueError):
        store.settle(store.reserve(rec.id, 0), completion_tokens=1, prompt_tokens=0)


def test_budgets_hold_under_concurrency(store):
    _, rec = store.create_key("c", max_completion_tokens=100, max_requests=40)
    outcomes = []
    lock = threading.Lock()

    def worker(seed):
        for i in range(15):
            ask = 1 + (seed * 7 + i * 3) % 9
            try:
                r = store.reserve(rec.id, ask)
            except Rejected as e:
                with lock:
                    outcomes.append(("rejected", e.code))
                continue
            store.settle(r, completion_tokens=ask - (i % 2), prompt_tokens=1,
                         ledger={"request_id": f"{seed}-{i}", "key_id": rec.id, "time": 0.0, "endpoint": "x",
                                 "status": 200, "latency_ms": 0.0, "completion_tokens": ask - (i % 2)})
            with lock:
                outcomes.append(("ok", ask - (i % 2)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    k = store.get_key(rec.id)
    served = [n for kind, n in outcomes if kind == "ok"]
    assert k.tokens_used == sum(served) <= 100 and k.requests_used == len(served) <= 40
    assert k.tokens_reserved == 0 and k.requests_reserved == 0
    assert len(outcomes) == 120 and any(kind == "rejected" for kind, _ in outcomes)
    assert store.ledger_count() == len(served)
    assert store.totals()[0]["completion_tokens"] == k.tokens_used


def test_token_bucket_rate_limit(store):
    _, rec = store.create_key("r", rate_per_minute=60, burst=2)
    store.reserve(rec.id, 0, now=1000.0)
    store.reserve(rec.id, 0, now=1000.0)
    with pytest.raises(Rejected) as e:
        store.reserve(rec.id, 0, now=1000.2)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.retry_after == pytest.approx(0.8) and e.value.should_retry
    store.reserve(rec.id, 0, now=1001.0)  # one token refilled after a second
    with pytest.raises(Rejected):
        store.reserve(rec.id, 0, now=1001.0)
    store.reserve(rec.id, 0, now=1100.0)
    store.reserve(rec.id, 0, now=1100.0)  # refilled to the burst size, not beyond
    with pytest.raises(Rejected):
        store.reserve(rec.id, 0, now=1100.0)


def test_reset_reservations_and_ledger_export(store):
    _, a = store.create_key("a")
    _, b = store.create_key("b")
    store.reserve(a.id, 5)  # a server that crashed mid-request
    assert store.reset_reservations() == 1 and store.get_key(a.id).tokens_reserved == 0
    for i, (key, status, tokens) in enumerate([(a.id, 200, 5), (b.id, 429, 0), (None, 401, 0), (a.id, 200, 3)]):
        store.record({"request_id": str(i), "key_id": key, "time": 100.0 + i, "endpoint": "chat.completions",
                      "status": status, "latency_ms": 2.0, "completion_tokens": tokens, "prompt_tokens": 1})
    out = io.StringIO()
    assert store.export_csv(out) == 4
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("id,request_id,key_id,time") and len(lines) == 5
    totals = {t["key_id"]: t for t in store.totals()}
    assert totals[a.id]["completion_tokens"] == 8 and totals[a.id]["ok"] == 2 and totals[a.id]["name"] == "a"
    assert totals[b.id]["limited"] == 1 and totals[None]["denied"] == 1
    assert len(store.ledger_rows(a.id)) == 2


def test_store_location_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLARENA_CACHE", str(tmp_path / "cache"))
    assert ServeConfig().store_path() == tmp_path / "cache" / "serve" / "store.sqlite"
    assert ServeConfig(store=str(tmp_path / "x.db")).store_path() == tmp_path / "x.db"
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable SQLite store"):
        Store(tmp_path / "junk.sqlite")
    with Store(tmp_path / "w.sqlite") as s:
        assert s._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_files_are_readable_by_their_owner_only(tmp_path):
    path = tmp_path / "new" / "s.sqlite"
    with Store(path, kdf=FAST_KDF) as s:
        s.create_key("a")
        files = [path, path.with_name("s.sqlite-wal"), path.with_name("s.sqlite-shm")]
        assert all(f.exists() and f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert path.parent.stat().st_mode & 0o077 == 0
    old = tmp_path / "old.sqlite"
    Store(old, kdf=FAST_KDF).close()
    old.chmod(0o644)  # a store from before: made private when it is opened
    Store(old, kdf=FAST_KDF).close()
    assert old.stat().st_mode & 0o777 == 0o600


V1_SCHEMA = """
CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, kdf TEXT NOT NULL, salt BLOB NOT NULL, hash BLOB NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL, policy TEXT NOT NULL, max_requests INTEGER,
    max_completion_tokens INTEGER, rate_per_minute REAL, burst REAL, requests_used INTEGER NOT NULL DEFAULT 0,
    requests_reserved INTEGER NOT NULL DEFAULT 0, tokens_used INTEGER NOT NULL DEFAULT 0,
    tokens_reserved INTEGER NOT NULL DEFAULT 0, prompt_tokens_used INTEGER NOT NULL DEFAULT 0, bucket_tokens REAL,
    bucket_at REAL);
CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, key_id TEXT, time REAL NOT NULL,
    endpoint TEXT NOT NULL, model TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, reserved_tokens INTEGER NOT NULL DEFAULT 0,
    n INTEGER NOT NULL DEFAULT 0, defense TEXT, status INTEGER NOT NULL, error_code TEXT, latency_ms REAL NOT NULL,
    stream INTEGER NOT NULL DEFAULT 0);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_store_of_schema_version_1_is_upgraded_in_place(tmp_path):
    import hashlib
    import json

    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    salt = b"0" * 16
    digest = hashlib.scrypt(b"secret", salt=salt, n=1024, r=8, p=1, maxmem=2**27, dklen=32)
    policy = {"defense": "top_k", "strength": 5.0, "logprobs": True, "max_top_logprobs": 3, "decimals": 2,
              "noise_std": 0.0}  # the policy format of the first stores
    conn.execute("INSERT INTO keys (id, name, kdf, salt, hash, created_at, policy, max_completion_tokens, tokens_used) "
                 "VALUES ('0123456789ab', 'old', 'scrypt:1024:8:1', ?, ?, 1.0, ?, 100, 7)",
                 (salt, digest, json.dumps(policy)))
    conn.execute("INSERT INTO ledger (request_id, key_id, time, endpoint, prompt_tokens, completion_tokens, status, "
                 "latency_ms) VALUES ('r', '0123456789ab', 1.0, 'completions', 5, 7, 200, 1.0)")
    conn.execute("INSERT INTO ledger (request_id, key_id, time, endpoint, prompt_tokens, completion_tokens, status, "
                 "latency_ms) VALUES ('s', '0123456789ab', 2.0, 'completions', 9, 0, 400, 1.0)")
    conn.commit()
    conn.close()
    with Store(path) as s:
        rec = s.authenticate("da-0123456789ab-secret")
        assert rec.policy == PolicyConfig(defense="truncation", params={"top_k": 5}, max_top_logprobs=3, decimals=2)
        assert (rec.tokens_used, rec.max_completion_tokens, rec.count_prompt) == (7, 100, False)
        assert [r["billed_tokens"] for r in s.ledger_rows()] == [7, 0]
        totals = s.totals()[0]
        assert totals["prompt_tokens"] == 5 and totals["billed_tokens"] == 7  # the refused request's prompt not counted
        assert s._conn().execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()[0] == "2"
        key = s.noise_key(rec.policy)
    with Store(path) as s:  # the noise secret is the store's: the same after a restart
        assert s.noise_key(rec.policy) == key


def test_wrong_secrets_cost_no_scrypt_once_a_key_is_proven_and_unproven_ones_are_budgeted(tmp_path, monkeypatch):
    from distillarena.serve import store as store_module

    calls = []
    real = store_module._kdf
    monkeypatch.setattr(store_module, "_kdf", lambda *a: calls.append(1) or real(*a))
    with Store(tmp_path / "s.sqlite", kdf=FAST_KDF, kdf_share=0.01, kdf_burst_s=0.05) as s:
        token, rec = s.create_key("a")
        _, other = s.create_key("b")
        calls.clear()
        assert s.authenticate(token).id == rec.id and len(calls) == 1
        for i in range(200):  # wrong secrets for a proven key id: compared in microseconds, never hashed
            with pytest.raises(Rejected) as e:
                s.authenticate(f"da-{rec.id}-wrong{i}")
            assert e.value.status == 401
        assert s.authenticate(token).id == rec.id and len(calls) == 1
        statuses = []
        for i in range(400):  # wrong secrets for a key not yet proven: scrypt, within its budget, then 429
            try:
                s.authenticate(f"da-{other.id}-wrong{i}")
            except Rejected as r:
                statuses.append(r.status)
        hashed = len(calls) - 1
        assert statuses.count(429) > 0 and statuses.count(401) == hashed < 400
        with pytest.raises(Rejected) as e:
            s.authenticate(f"da-{other.id}-wrong0")  # a token already refused: remembered, not hashed again
        assert e.value.status == 401 and len(calls) - 1 == hashed
