"""API keys, budgets, rate limits and the request ledger, in one SQLite file (WAL mode), readable by its owner only
(the file, its ``-wal`` and ``-shm`` are 0600).

Keys are bearer tokens ``da-<id>-<secret>``: ``id`` (12 hex characters) is not secret and finds the row; the
secret (``secrets.token_urlsafe(32)``, 256 bits) is stored only as a salted scrypt hash with its parameters. The
token is shown once, at creation. Once a key's secret is proven in this process, an HMAC of it under a random
per-process key is remembered (never the secret), so later requests of that key, and wrong secrets for it, are
checked in microseconds; scrypt runs for a key not yet proven, at most ``kdf_share`` of one core on average (a
token bucket of scrypt seconds; beyond it :meth:`Store.authenticate` refuses with 429 without hashing), and a wrong
token already refused is remembered too. Revocation is read from the database every request.

Budgets are exact under concurrency. Each key has a request budget and a token budget (None: unlimited), which
counts completion tokens, or prompt and completion tokens for a key created with ``count_prompt`` (as providers
bill); prompt tokens a request *scores* (echo with log-probs, ``prompt_logprobs``) are counted on every key. Before
generation, :meth:`Store.reserve` takes one request and the most the request can be billed in a ``BEGIN IMMEDIATE``
transaction and refuses (429) when ``used + reserved + asked`` would exceed the budget; after generation,
:meth:`Store.settle` returns the reservation, adds the tokens actually billed (never more than reserved) and
inserts the ledger row, in one transaction. So ``used`` can never exceed the budget, not even by one token. A
streamed answer is billed its whole reservation, and its ledger row committed, before its first byte is sent
(:meth:`Store.begin_stream`); its end refunds what it did not generate (:meth:`Store.end_stream`), so a server
killed mid-stream over-bills, never under-bills. Reservations of a server that crashed are cleared by
:meth:`Store.reset_reservations` at the next start (one server per store file is assumed; several processes on one
store share the budgets exactly but must not reset each other's reservations).

Rate limits are a token bucket per key (``rate_per_minute``, bucket size ``burst``, default one minute's worth),
kept in the key's row and updated in the same transaction as the reservation; an admitted request takes one token.

The ledger has one row per request to the generation endpoints made with a key that exists and is proven (refused
ones included: 400, 403 revoked, 413, 429), committed before the response is sent. Requests without a valid key
(missing, malformed, unknown, wrong secret: 401) get no row each: they are counted per minute, endpoint and error
code in ``rejections`` (:meth:`Store.count_rejection`), written at most once a second and when the store closes,
so a flood of them costs no commit each (a kill loses at most the last second's counts).

The store also holds the server's noise secret (``meta``), drawn when the store is created: the key of the reveal
noise (:meth:`Store.noise_key`), the same across restarts so that noise cannot be averaged over them.

Schema version 2; a version-1 store (before prompt billing, the noise secret and the rejection counts) is upgraded
in place when it is opened: its keys keep their policies and budgets and count completion tokens, as before.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from distillarena.core.errors import UserError
from distillarena.serve.config import PolicyConfig

TOKEN_PREFIX = "da"
SCHEMA_VERSION = 2
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
REJECTION_FLUSH_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kdf TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    policy TEXT NOT NULL,
    max_requests INTEGER,
    max_completion_tokens INTEGER,
    rate_per_minute REAL,
    burst REAL,
    requests_used INTEGER NOT NULL DEFAULT 0,
    requests_reserved INTEGER NOT NULL DEFAULT 0,
    tokens_used INTEGER NOT NULL DEFAULT 0,
    tokens_reserved INTEGER NOT NULL DEFAULT 0,
    prompt_tokens_used INTEGER NOT NULL DEFAULT 0,
    bucket_tokens REAL,
    bucket_at REAL,
    count_prompt INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    key_id TEXT,
    time REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_tokens INTEGER NOT NULL DEFAULT 0,
    n INTEGER NOT NULL DEFAULT 0,
    defense TEXT,
    status INTEGER NOT NULL,
    error_code TEXT,
    latency_ms REAL NOT NULL,
    stream INTEGER NOT NULL DEFAULT 0,
    billed_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ledger_key_time ON ledger (key_id, time);
CREATE TABLE IF NOT EXISTS rejections (
    minute INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (minute, endpoint, code)
);
"""
# columns that version 2 added to tables of version 1 (added in place when a version-1 store is opened)
_ADDED = (("keys", "count_prompt", "INTEGER NOT NULL DEFAULT 0"),
          ("ledger", "billed_tokens", "INTEGER NOT NULL DEFAULT 0"))

LEDGER_COLUMNS = ("id", "request_id", "key_id", "time", "endpoint", "model", "prompt_tokens", "completion_tokens",
                  "reserved_tokens", "n", "defense", "status", "error_code", "latency_ms", "stream", "billed_tokens")


class Rejected(Exception):
    """A request refused by the store: an HTTP status and an OpenAI-style error."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None,
                 retry_after: float | None = None, should_retry: bool | None = None,
                 key: KeyRecord | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.retry_after, self.should_retry, self.key = retry_after, should_retry, key


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    created_at: float
    revoked_at: float | None
    policy: PolicyConfig
    max_requests: int | None
    max_completion_tokens: int | None
    rate_per_minute: float | None
    burst: float | None
    requests_used: int
    requests_reserved: int
    tokens_used: int
    tokens_reserved: int
    prompt_tokens_used: int
    count_prompt: bool = False  # the token budget counts prompt tokens too

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.model_dump()
        return d


@dataclass(frozen=True)
class Reservation:
    key_id: str
    tokens: int
    requests: int = 1


def parse_token(token: str) -> tuple[str, str] | None:
    parts = token.split("-", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    if len(parts[1]) != 12 or any(c not in "0123456789abcdef" for c in parts[1]):
        return None
    return parts[1], parts[2]


def _kdf(secret: str, salt: bytes, spec: str) -> bytes:
    name, n, r, p = spec.split(":")
    if name != "scrypt":
        raise ValueError(f"unknown key derivation {spec!r}")
    return hashlib.scrypt(secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), maxmem=2**27, dklen=32)


class Store:
    """The key store and ledger over one SQLite file; safe to use from many threads (a connection per thread)."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal", kdf: str | None = None,
                 cache_size: int = 4096, kdf_share: float = 0.25, kdf_burst_s: float = 2.0):
        self.path = Path(path).expanduser()
        if synchronous not in ("normal", "full"):
            raise UserError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.synchronous = synchronous
        self.kdf = kdf or f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}"
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, mode=0o700)
            _owner_only(self.path)
        except OSError as e:
            raise UserError(f"cannot create the store {self.path}: {e}") from None
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pepper = secrets.token_bytes(32)  # per process: what proven secrets are remembered under
        self._proven: dict[str, bytes] = {}  # key id -> HMAC(pepper, secret) of its proven secret
        self._refused: OrderedDict[bytes, None] = OrderedDict()  # SHA-256 of tokens refused after scrypt
        self._cache_size = cache_size
        self._kdf_lock = threading.Lock()  # one scrypt at a time
        self._kdf_rate, self._kdf_burst = float(kdf_share), float(kdf_burst_s)
        self._kdf_level, self._kdf_at = self._kdf_burst, time.monotonic()
        self._rejected: dict[tuple[int, str, str], int] = {}
        self._flush_timer: threading.Timer | None = None
        try:
            self._conn().execute("PRAGMA journal_mode=WAL")
            with self._tx() as c:
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    c.execute(stmt)
                row = c.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
                if row is None:
                    c.execute("INSERT INTO meta (k, v) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 1:
                    self._upgrade_from_1(c)
                elif int(row[0]) != SCHEMA_VERSION:
                    raise UserError(f"store {self.path} has schema version {row[0]}, this version reads "
                                    f"{SCHEMA_VERSION}")
                secret = c.execute("SELECT v FROM meta WHERE k = 'noise_secret'").fetchone()
                if secret is None:
                    secret = (secrets.token_hex(32),)
                    c.execute("INSERT INTO meta (k, v) VALUES ('noise_secret', ?)", secret)
                self._noise_secret = bytes.fromhex(secret[0])
        except sqlite3.DatabaseError as e:
            self.close()
            raise UserError(f"{self.path} is not a usable SQLite store: {e}") from None
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the database's mode; older ones may be wider
            with contextlib.suppress(OSError):
                os.chmod(f"{self.path}{suffix}", 0o600)

    @staticmethod
    def _upgrade_from_1(c: sqlite3.Connection) -> None:
        """Version 1 -> 2 in place: the new columns (existing keys count completion tokens only, as before; a
        served request was billed its completion tokens) and the rejection counts."""
        for table, column, decl in _ADDED:
            have = {r[1] for r in c.execute(f"PRAGMA table_info({table})").fetchall()}
            if column not in have:
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        c.execute("UPDATE ledger SET billed_tokens = completion_tokens WHERE status = 200")
        c.execute("UPDATE meta SET v = ? WHERE k = 'schema'", (str(SCHEMA_VERSION),))

    def noise_key(self, policy: PolicyConfig) -> bytes:
        """The key of a policy's reveal noise: the store's secret and the policy's :meth:`~PolicyConfig.noise_id`."""
        return hmac.new(self._noise_secret, policy.noise_id(), hashlib.sha256).digest()

    # -- connections and transactions ------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception): one writer at a time, no lost update."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.flush_rejections()
        with self._lock:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            for c in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys --------------------------------------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> KeyRecord:
        return KeyRecord(
            id=row["id"], name=row["name"], created_at=row["created_at"], revoked_at=row["revoked_at"],
            policy=PolicyConfig.model_validate(json.loads(row["policy"])),
            max_requests=row["max_requests"], max_completion_tokens=row["max_completion_tokens"],
            rate_per_minute=row["rate_per_minute"], burst=row["burst"], requests_used=row["requests_used"],
            requests_reserved=row["requests_reserved"], tokens_used=row["tokens_used"],
            tokens_reserved=row["tokens_reserved"], prompt_tokens_used=row["prompt_tokens_used"],
            count_prompt=bool(row["count_prompt"]),
        )

    def create_key(self, name: str = "", *, policy: PolicyConfig | None = None, max_requests: int | None = None,
                   max_completion_tokens: int | None = None, rate_per_minute: float | None = None,
                   burst: float | None = None, count_prompt: bool = False) -> tuple[str, KeyRecord]:
        """A new key; returns ``(token, record)``. The token is not stored and cannot be shown again.
        ``max_completion_tokens`` is the token budget; with ``count_prompt`` it counts prompt tokens too."""
        for what, v in (("max_requests", max_requests), ("max_completion_tokens", max_completion_tokens)):
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 0):
                raise UserError(f"{what} must be an integer >= 0 (or unlimited), got {v}")
        if rate_per_minute is not None and not (rate_per_minute > 0 and math.isfinite(rate_per_minute)):
            raise UserError(f"rate_per_minute must be > 0 (or unlimited), got {rate_per_minute}")
        if burst is not None and not (burst >= 1 and math.isfinite(burst)):
            raise UserError(f"burst must be >= 1, got {burst}")
        policy = policy or PolicyConfig()
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        digest = _kdf(secret, salt, self.kdf)
        now = time.time()
        for _ in range(8):
            key_id = secrets.token_hex(6)
            try:
                with self._tx() as c:
                    c.execute(
                        "INSERT INTO keys (id, name, kdf, salt, hash, created_at, policy, max_requests, "
                        "max_completion_tokens, rate_per_minute, burst, count_prompt) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key_id, name, self.kdf, salt, digest, now, policy.model_dump_json(), max_requests,
                         max_completion_tokens, rate_per_minute, burst, int(bool(count_prompt))),
                    )
            except sqlite3.IntegrityError:  # an id collision (2**-48 per pair): draw another
                continue
            record = self.get_key(key_id)
            assert record is not None
            return f"{TOKEN_PREFIX}-{key_id}-{secret}", record
        raise RuntimeError("could not draw a free key id")

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._conn().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else self._record(row)

    def list_keys(self) -> list[KeyRecord]:
        rows = self._conn().execute("SELECT * FROM keys ORDER BY created_at, id").fetchall()
        return [self._record(r) for r in rows]

    def revoke_key(self, key_id: str) -> KeyRecord:
        with self._tx() as c:
            row = c.execute("SELECT revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise UserError(f"no key with id {key_id!r} in {self.path}")
            if row["revoked_at"] is None:
                c.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
        record = self.get_key(key_id)
        assert record is not None
        return record

    def authenticate(self, token: str | None) -> KeyRecord:
        """The key of a bearer token; :class:`Rejected` 401 (missing, malformed, unknown, wrong), 403 (revoked) or
        429 (too many secrets to verify right now: see the module docstring)."""
        if not token:
            raise Rejected(401, "You didn't provide an API key. Provide it as 'Authorization: Bearer <key>'.",
                           type="invalid_request_error", code="missing_api_key")
        wrong = Rejected(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")
        parsed = parse_token(token)
        if parsed is None:
            raise wrong
        key_id, secret = parsed
        row = self._conn().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise wrong
        try:
            tag = hmac.new(self._pepper, secret.encode(), hashlib.sha256).digest()
        except UnicodeEncodeError:
            raise wrong from None
        with self._lock:
            proven = self._proven.get(key_id)
        if proven is not None:
            if not hmac.compare_digest(proven, tag):
                raise wrong
        else:
            self._verify(token, key_id, secret, row, tag, wrong)
        record = self._record(row)
        if record.revoked:
            raise Rejected(403, "This API key has been revoked.", type="permission_error", code="api_key_revoked",
                           key=record)
        return record

    def _verify(self, token: str, key_id: str, secret: str, row: sqlite3.Row, tag: bytes, wrong: Rejected) -> None:
        """scrypt, for a key not yet proven in this process: within the KDF budget, one at a time."""
        fingerprint = hashlib.sha256(token.encode()).digest()
        with self._lock:
            if fingerprint in self._refused:
                self._refused.move_to_end(fingerprint)
                raise wrong
            now = time.monotonic()
            self._kdf_level = min(self._kdf_burst, self._kdf_level + (now - self._kdf_at) * self._kdf_rate)
            self._kdf_at = now
            if self._kdf_level <= 0:
                wait = -self._kdf_level / self._kdf_rate + 0.05
                raise Rejected(429, "Too many API keys to verify right now. Try again in "
                               f"{wait:.2f}s.", type="requests", code="rate_limit_exceeded", retry_after=wait,
                               should_retry=True)
        with self._kdf_lock:
            t0 = time.perf_counter()
            try:
                ok = hmac.compare_digest(_kdf(secret, row["salt"], row["kdf"]), row["hash"])
            except (ValueError, UnicodeEncodeError):
                ok = False
            spent = time.perf_counter() - t0
        with self._lock:
            self._kdf_level -= spent
            if ok:
                self._proven[key_id] = tag
            else:
                self._refused[fingerprint] = None
                while len(self._refused) > self._cache_size:
                    self._refused.popitem(last=False)
        if not ok:
            raise wrong

    # -- budgets -------------------------------------------------------------------------------------------------
    def reserve(self, key_id: str, tokens: int, *, requests: int = 1, now: float | None = None) -> Reservation:
        """Take one request from the rate limit and reserve ``requests`` and ``tokens`` from the budgets, or raise
        :class:`Rejected` (403 revoked, 429 rate or budget). Nothing changes when it raises."""
        if tokens < 0 or requests < 0:
            raise ValueError("a reservation cannot be negative")
        with self._tx() as c:
            row = c.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise Rejected(401, "Incorrect API key provided.", type="invalid_request_error",
                               code="invalid_api_key")
            key = self._record(row)
            if key.revoked:
                raise Rejected(403, "This API key has been revoked.", type="permission_error",
                               code="api_key_revoked", key=key)
            now = time.time() if now is None else now
            bucket = None
            if key.rate_per_minute is not None:
                per_s = key.rate_per_minute / 60.0
                size = key.burst if key.burst is not None else max(1.0, key.rate_per_minute)
                level = size if row["bucket_tokens"] is None else row["bucket_tokens"]
                level = min(size, level + max(0.0, now - (row["bucket_at"] or now)) * per_s)
                if level < 1.0:
                    wait = (1.0 - level) / per_s
                    raise Rejected(429, f"Rate limit reached: {key.rate_per_minute:g} requests per minute. "
                                   f"Try again in {wait:.2f}s.", type="requests", code="rate_limit_exceeded",
                                   retry_after=wait, should_retry=True, key=key)
                bucket = level - 1.0
            self._check_budget(key, "requests", key.max_requests, key.requests_used, key.requests_reserved,
                               requests)
            self._check_budget(key, "token" if key.count_prompt else "completion tokens", key.max_completion_tokens,
                               key.tokens_used, key.tokens_reserved, tokens)
            c.execute(
                "UPDATE keys SET requests_reserved = requests_reserved + ?, tokens_reserved = tokens_reserved + ?, "
                "bucket_tokens = COALESCE(?, bucket_tokens), bucket_at = CASE WHEN ? IS NULL THEN bucket_at "
                "ELSE ? END WHERE id = ?",
                (requests, tokens, bucket, bucket, now, key_id),
            )
        return Reservation(key_id, int(tokens), int(requests))

    @staticmethod
    def _check_budget(key: KeyRecord, what: str, budget: int | None, used: int, reserved: int, asked: int) -> None:
        if budget is None or used + reserved + asked <= budget:
            return
        left = max(0, budget - used)
        if used + asked <= budget:  # only requests in flight stand in the way: they settle soon
            raise Rejected(429, f"The {what} budget of this key is held by requests in flight ({left} left, "
                           f"{reserved} reserved, this request needs {asked}). Try again shortly.",
                           type="insufficient_quota", code="budget_reserved", retry_after=1.0, should_retry=True,
                           key=key)
        hint = (" (the most a request can be billed, max_tokens x n per prompt, is reserved before generating: "
                "ask for fewer)") if what != "requests" else ""
        raise Rejected(429, f"This key's {what} budget is exhausted: {left} of {budget} left, this request needs "
                       f"{asked}{hint}.", type="insufficient_quota", code="insufficient_quota", should_retry=False,
                       key=key)

    def settle(self, reservation: Reservation, *, completion_tokens: int, prompt_tokens: int,
               ledger: dict[str, Any] | None = None, used: bool = True, billed: int | None = None) -> None:
        """Return a reservation; with ``used`` count the request and bill it ``billed`` tokens (default
        ``completion_tokens``; at most the tokens reserved), without (a failed request) count nothing. Inserts the
        ledger row (with ``billed_tokens``) in the same transaction."""
        billed = completion_tokens if billed is None else billed
        if used and billed > reservation.tokens:
            raise ValueError(f"{billed} tokens billed but only {reservation.tokens} reserved")
        req, tok, ptok = (reservation.requests, billed, prompt_tokens) if used else (0, 0, 0)
        with self._tx() as c:
            c.execute(
                "UPDATE keys SET requests_reserved = requests_reserved - ?, tokens_reserved = tokens_reserved - ?, "
                "requests_used = requests_used + ?, tokens_used = tokens_used + ?, "
                "prompt_tokens_used = prompt_tokens_used + ? WHERE id = ?",
                (reservation.requests, reservation.tokens, req, tok, ptok, reservation.key_id),
            )
            if ledger is not None:
                self._insert_ledger(c, {**ledger, "billed_tokens": tok})

    def begin_stream(self, reservation: Reservation, *, prompt_tokens: int, ledger: dict[str, Any]) -> int:
        """Bill a streamed request its whole reservation and commit its ledger row (status 200, ``billed_tokens``
        the reservation) before its first byte is sent; returns the row's id for :meth:`end_stream`."""
        with self._tx() as c:
            c.execute(
                "UPDATE keys SET requests_reserved = requests_reserved - ?, tokens_reserved = tokens_reserved - ?, "
                "requests_used = requests_used + ?, tokens_used = tokens_used + ?, "
                "prompt_tokens_used = prompt_tokens_used + ? WHERE id = ?",
                (reservation.requests, reservation.tokens, reservation.requests, reservation.tokens, prompt_tokens,
                 reservation.key_id),
            )
            return self._insert_ledger(c, {**ledger, "billed_tokens": reservation.tokens})

    def end_stream(self, reservation: Reservation, row_id: int, *, completion_tokens: int, billed: int,
                   latency_ms: float, status: int = 200, error_code: str | None = None) -> None:
        """A stream has ended: refund what it was billed beyond ``billed`` (at most its reservation) and write its
        final numbers into its ledger row."""
        billed = min(int(billed), reservation.tokens)
        with self._tx() as c:
            c.execute("UPDATE keys SET tokens_used = tokens_used - ? WHERE id = ?",
                      (reservation.tokens - billed, reservation.key_id))
            c.execute("UPDATE ledger SET completion_tokens = ?, billed_tokens = ?, latency_ms = ?, status = ?, "
                      "error_code = ? WHERE id = ?", (completion_tokens, billed, latency_ms, status, error_code,
                                                      row_id))

    def reset_reservations(self) -> int:
        """Drop every reservation (those of a server that stopped mid-request); returns how many keys had one."""
        with self._tx() as c:
            cur = c.execute("UPDATE keys SET requests_reserved = 0, tokens_reserved = 0 "
                            "WHERE requests_reserved != 0 OR tokens_reserved != 0")
            return cur.rowcount

    # -- ledger --------------------------------------------------------------------------------------------------
    @staticmethod
    def _insert_ledger(c: sqlite3.Connection, row: dict[str, Any]) -> int:
        cols = [k for k in LEDGER_COLUMNS if k != "id" and k in row]
        cur = c.execute(f"INSERT INTO ledger ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [row[k] for k in cols])
        return int(cur.lastrowid)

    def count_rejection(self, endpoint: str, code: str, now: float | None = None) -> None:
        """Count one request refused without a valid key (no ledger row): added to ``rejections`` for its minute
        at the next flush (at most :data:`REJECTION_FLUSH_S` later, or when the store closes)."""
        minute = int((time.time() if now is None else now) // 60)
        with self._lock:
            k = (minute, endpoint, code)
            self._rejected[k] = self._rejected.get(k, 0) + 1
            if self._flush_timer is None:
                self._flush_timer = threading.Timer(REJECTION_FLUSH_S, self._timed_flush)
                self._flush_timer.daemon = True
                self._flush_timer.start()

    def _timed_flush(self) -> None:
        with self._lock:
            self._flush_timer = None
        with contextlib.suppress(sqlite3.Error):
            self.flush_rejections()

    def flush_rejections(self) -> None:
        """Write the counted rejections (one transaction)."""
        with self._lock:
            pending, self._rejected = self._rejected, {}
        if not pending:
            return
        with self._tx() as c:
            c.executemany("INSERT INTO rejections (minute, endpoint, code, count) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT (minute, endpoint, code) DO UPDATE SET count = count + excluded.count",
                          [(m, e, code, n) for (m, e, code), n in pending.items()])

    def rejections(self) -> list[dict[str, Any]]:
        """Requests refused without a valid key, per error code and endpoint: count, first and last minute."""
        self.flush_rejections()
        rows = self._conn().execute(
            "SELECT code, endpoint, SUM(count) AS count, MIN(minute) * 60 AS first, MAX(minute) * 60 + 59 AS last "
            "FROM rejections GROUP BY code, endpoint ORDER BY code, endpoint").fetchall()
        return [dict(r) for r in rows]

    def record(self, ledger: dict[str, Any]) -> None:
        """Insert one ledger row (a request that reserved nothing) and commit."""
        with self._tx() as c:
            self._insert_ledger(c, ledger)

    def ledger_rows(self, key_id: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger"
        args: tuple = ()
        if key_id is not None:
            sql, args = sql + " WHERE key_id = ?", (key_id,)
        return [dict(r) for r in self._conn().execute(sql + " ORDER BY id", args).fetchall()]

    def ledger_count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    def totals(self) -> list[dict[str, Any]]:
        """Per key (and one row for older rows with no known key): requests by outcome, tokens of served requests
        (prompt, completion, billed), latency, first/last. Requests refused without a key: :meth:`rejections`."""
        rows = self._conn().execute(
            "SELECT l.key_id AS key_id, k.name AS name, COUNT(*) AS requests, "
            "SUM(l.status = 200) AS ok, SUM(l.status = 400) AS bad_request, SUM(l.status IN (401, 403)) AS denied, "
            "SUM(l.status = 429) AS limited, SUM(l.status >= 500) AS server_errors, "
            "SUM(CASE WHEN l.status = 200 THEN l.prompt_tokens ELSE 0 END) AS prompt_tokens, "
            "SUM(l.completion_tokens) AS completion_tokens, SUM(l.billed_tokens) AS billed_tokens, "
            "AVG(CASE WHEN l.status = 200 THEN l.latency_ms END) AS mean_latency_ms, "
            "MIN(l.time) AS first, MAX(l.time) AS last, GROUP_CONCAT(DISTINCT l.defense) AS defenses "
            "FROM ledger l LEFT JOIN keys k ON k.id = l.key_id GROUP BY l.key_id ORDER BY MIN(l.time)"
        ).fetchall()
        return [dict(r) for r in rows]

    def export_csv(self, out: IO[str], key_id: str | None = None) -> int:
        """Write the ledger as CSV (header + one line per request); returns the number of rows."""
        w = csv.writer(out)
        w.writerow(LEDGER_COLUMNS)
        rows = self.ledger_rows(key_id)
        for r in rows:
            w.writerow([r[k] for k in LEDGER_COLUMNS])
        return len(rows)


def _owner_only(path: Path) -> None:
    """Create ``path`` readable and writable by its owner only, or make an existing file so."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


__all__ = ["LEDGER_COLUMNS", "SCHEMA_VERSION", "KeyRecord", "Rejected", "Reservation", "Store", "parse_token"]
