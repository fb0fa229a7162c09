"""The attacker's client: a teacher behind any OpenAI-compatible API (this project's server, or a real provider).

:class:`APITeacher` asks the API for completions with the official ``openai`` Python client and keeps what the API
reveals about each generated token (its text, bytes, log-prob and top alternatives, when the key is allowed them),
for the game and for distillation. :meth:`APITeacher.collect` runs a whole prompt set:

- bounded concurrency (at most ``concurrency`` requests in flight; a new one starts as one is answered);
- retries with exponential backoff and jitter on 429 (rate limit, or a budget held by requests in flight), 5xx,
  timeouts and connection errors, honouring ``Retry-After`` / ``retry-after-ms``; a 429 that says retrying cannot
  help (``insufficient_quota``, ``x-should-retry: false``), 401 / 403 / 404 and an unknown model stop the
  collection (the requests in flight are still written), since every later request would fail the same way; any
  other 4xx is written to ``<out>.errors.jsonl`` and the collection goes on;
- a resumable JSON lines output: one record per prompt, appended, flushed and fsynced as soon as it is answered, so
  a crash or a kill loses nothing already written; run the same collection again and it skips the ids already in
  the file (a torn last line from a kill is cut off first), so nothing is asked twice or written twice.

One output record (keys in this order)::

    {"id", "prompt" | "messages", "model", "params": {...}, "choices": [{"text", "finish_reason",
     "tokens", "token_bytes" (chat only), "token_logprobs", "top_logprobs": [[[token, logprob], ...] per token]}],
     "usage": {...}, "response_id", "attempts", "latency_s", "time"}

``tokens`` and log-prob fields are ``null`` when log-probs were not asked for (``top_logprobs=None``).

This module imports neither torch nor any other part of the project except its error type.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillarena.core.errors import UserError
from distillarena.core.io import read_jsonl

# refusals that every later request would get too: stop instead of writing one error per prompt
_FATAL_CODES = {"model_not_found", "invalid_api_key", "missing_api_key", "api_key_revoked", "insufficient_quota"}


class CollectionStopped(UserError):
    """The API refused in a way no retry can fix (key revoked or unknown, budget spent)."""


@dataclass
class CollectSummary:
    path: Path
    total: int  # distinct prompts given
    skipped: int  # already in the output before this run
    written: int  # answered in this run
    failed: int  # refused with a 4xx that concerns the prompt (see <out>.errors.jsonl)
    retries: int  # retried attempts in this run
    stopped: str | None = None  # why the collection stopped early, if it did


@dataclass
class Budget:
    """What a collection may spend, over every run into the same output (answers already there count): ``tokens``
    (as the API bills them: ``usage.total_tokens``) and ``requests``; ``None`` is unlimited. A request starts only if
    its estimated cost fits beside what is spent and what is in flight, so a budget is never overrun by more than
    the estimates' error; when nothing more fits the collection stops, keeping every answer paid for."""

    tokens: int | None = None
    requests: int | None = None
    spent_tokens: int = 0
    spent_requests: int = 0
    _held_tokens: int = 0
    _held_requests: int = 0

    def reserve(self, estimate: int) -> str | None:
        """Hold ``estimate`` tokens and one request; the reason why not, if they do not fit."""
        if self.requests is not None and self.spent_requests + self._held_requests + 1 > self.requests:
            return f"request budget spent ({self.spent_requests} of {self.requests} requests)"
        if self.tokens is not None and self.spent_tokens + self._held_tokens + estimate > self.tokens:
            return (f"token budget spent ({self.spent_tokens:,} of {self.tokens:,} tokens used; the next request "
                    f"needs about {estimate:,})")
        self._held_tokens += estimate
        self._held_requests += 1
        return None

    def settle(self, estimate: int, used: int | None, answered: bool) -> None:
        self._held_tokens -= estimate
        self._held_requests -= 1
        if answered:
            self.spent_requests += 1
            self.spent_tokens += estimate if used is None else used


def _used_tokens(record: dict[str, Any]) -> int | None:
    usage = record.get("usage") or {}
    total = usage.get("total_tokens")
    return int(total) if total is not None else None


@dataclass
class _Outcome:
    record: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    fatal: str | None = None
    retries: int = 0


@dataclass
class APITeacher:
    """A teacher reached through an OpenAI-compatible API.

    ``top_logprobs``: ``None`` asks for no log-probs; ``k >= 0`` asks for the chosen token's log-prob and ``k``
    alternatives (chat: ``logprobs=true, top_logprobs=k``; completions: ``logprobs=k``). ``chat`` selects
    ``/chat/completions`` (prompts given as text become one user message) or ``/completions``. ``extra_body``
    is sent as is (provider-specific parameters).
    """

    base_url: str
    api_key: str
    model: str
    chat: bool = True
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float | None = None
    n: int = 1
    top_logprobs: int | None = 5
    seed: int | None = None
    stop: list[str] | None = None
    concurrency: int = 8
    max_retries: int = 8
    backoff: float = 0.5  # first delay (s); doubled every retry, with full jitter
    max_backoff: float = 30.0
    timeout: float = 120.0
    extra_body: dict[str, Any] | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {self.max_retries}")
        try:
            import openai
        except ImportError:
            raise UserError("the API teacher needs the `openai` package: pip install -r requirements/serve.txt") \
                from None
        # retries are ours (with the reasons above), not the client's
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                     timeout=self.timeout)

    # -- one request ----------------------------------------------------------------------------------------------
    def params(self, item: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request's sampling parameters; a prompt record's own ``seed`` replaces the teacher's."""
        p: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "n": self.n}
        seed = item["seed"] if item is not None and item.get("seed") is not None else self.seed
        for name, value in (("top_p", self.top_p), ("seed", seed), ("stop", self.stop)):
            if value is not None:
                p[name] = value
        if self.top_logprobs is not None:
            if self.chat:
                p["logprobs"] = True
                if self.top_logprobs > 0:
                    p["top_logprobs"] = self.top_logprobs
            else:
                p["logprobs"] = self.top_logprobs
        return p

    def _request(self, item: dict[str, Any]):
        kw = self.params(item)
        if self.extra_body:
            kw["extra_body"] = self.extra_body
        if self.chat:
            messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
            return self._client.chat.completions.create(model=self.model, messages=messages, **kw)
        if "prompt" not in item:
            raise UserError(f"prompt {item.get('id')!r} has messages but the teacher uses /completions (chat=False)")
        return self._client.completions.create(model=self.model, prompt=item["prompt"], **kw)

    def query(self, item: dict[str, Any] | str) -> dict[str, Any]:
        """Ask one prompt (with retries); returns its record. Raises :class:`CollectionStopped` or ``UserError``."""
        item = {"id": None, "prompt": item} if isinstance(item, str) else item
        out = self._attempt(item)
        if out.fatal:
            raise CollectionStopped(out.fatal)
        if out.error is not None:
            raise UserError(f"the API refused the prompt: {out.error['error']}")
        assert out.record is not None
        return out.record

    def _attempt(self, item: dict[str, Any]) -> _Outcome:
        import openai

        retries = 0
        t0 = time.perf_counter()
        while True:
            try:
                resp = self._request(item)
                rec = self._record(item, resp)
                rec["attempts"] = retries + 1
                rec["latency_s"] = round(time.perf_counter() - t0, 4)
                return _Outcome(record=rec, retries=retries)
            except openai.APIStatusError as e:
                status = e.status_code
                should = (e.response.headers.get("x-should-retry") or "").lower()
                code = _error_code(e)
                retryable = (status == 429 or status >= 500 or status == 408) and should != "false" and \
                    code != "insufficient_quota"
                if not retryable or retries >= self.max_retries:
                    msg = f"HTTP {status}: {_error_message(e)}"
                    if status in (401, 403, 404) or (status == 429 and not retryable) or code in _FATAL_CODES:
                        return _Outcome(fatal=msg, retries=retries)
                    if retryable:  # out of retries on a transient error: not the prompt's fault, stop
                        return _Outcome(fatal=f"gave up after {retries} retries: {msg}", retries=retries)
                    return _Outcome(error={"id": item.get("id"), "status": status, "code": code, "error": msg},
                                    retries=retries)
                delay = _retry_after(e.response.headers)
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                if retries >= self.max_retries:
                    return _Outcome(fatal=f"gave up after {retries} retries: {type(e).__name__}: {e}",
                                    retries=retries)
                delay = None
            if delay is None:
                delay = random.uniform(0, min(self.max_backoff, self.backoff * 2**retries))
            retries += 1
            self.sleep(min(delay, self.max_backoff))

    def _record(self, item: dict[str, Any], resp) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": item.get("id")}
        if "messages" in item:
            rec["messages"] = item["messages"]
        else:
            rec["prompt"] = item["prompt"]
        rec["model"] = getattr(resp, "model", self.model)
        rec["params"] = self.params(item)
        rec["choices"] = [self._choice(c) for c in sorted(resp.choices, key=lambda c: c.index)]
        usage = getattr(resp, "usage", None)
        rec["usage"] = usage.model_dump() if usage is not None else None
        rec["response_id"] = getattr(resp, "id", None)
        rec["time"] = time.time()
        return rec

    def _choice(self, c) -> dict[str, Any]:
        out: dict[str, Any] = {"finish_reason": c.finish_reason}
        lp = getattr(c, "logprobs", None)
        if self.chat:
            out["text"] = c.message.content or ""
            content = getattr(lp, "content", None) if lp is not None else None
            if content is None:
                out.update(tokens=None, token_bytes=None, token_logprobs=None, top_logprobs=None)
            else:
                out["tokens"] = [t.token for t in content]
                out["token_bytes"] = [t.bytes for t in content]
                out["token_logprobs"] = [t.logprob for t in content]
                out["top_logprobs"] = [[[a.token, a.logprob] for a in (t.top_logprobs or [])] for t in content]
        else:
            out["text"] = c.text
            if lp is None or lp.tokens is None:
                out.update(tokens=None, token_logprobs=None, top_logprobs=None)
            else:
                out["tokens"] = list(lp.tokens)
                out["token_logprobs"] = list(lp.token_logprobs or [])
                out["top_logprobs"] = [[[k, v] for k, v in (d or {}).items()] for d in (lp.top_logprobs or [])]
        return out

    # -- a whole collection -----------------------------------------------------------------------------------------
    def estimate_tokens(self, item: dict[str, Any]) -> int:
        """A generous estimate of what a request bills (prompt + completion tokens), for a :class:`Budget`: token
        ids count one each, text one per byte (no tokenizer is at hand)."""
        prompt = item.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            n_prompt = len(prompt)
        elif isinstance(prompt, list):
            n_prompt = sum(len(p) if isinstance(p, list) else len(str(p).encode()) for p in prompt)
        elif prompt is not None:
            n_prompt = len(str(prompt).encode())
        else:
            n_prompt = sum(len(str(m.get("content", "")).encode()) + 8 for m in item.get("messages") or [])
        return n_prompt + self.max_tokens * self.n

    def collect(self, prompts: Iterable[dict[str, Any] | str], out: str | Path, *,
                progress: Callable[[int, int], None] | None = None, durable: bool = True,
                budget: Budget | None = None) -> CollectSummary:
        """Ask every prompt not already answered in ``out`` and append the answers there (see the module doc).

        ``prompts`` are records with an ``id`` and a ``prompt`` (text, or token ids for /completions; a list of them
        asks several prompts in one /completions request, answered prompt-major in ``choices``) or ``messages``,
        and optionally their own ``seed``; bare strings get their position as id. ``progress(done, total)`` is
        called after each answer. ``budget`` bounds what the collection spends (answers already in ``out`` are
        counted as spent); when it is used up the collection stops with ``stopped`` saying so.
        """
        path = Path(out)
        done = _load_done_ids(path)
        if budget is not None and done:
            for rec in read_jsonl(path):
                budget.spent_requests += 1
                budget.spent_tokens += _used_tokens(rec) or self.estimate_tokens(rec)
        items = list(_normalise(prompts))
        total = len(items)
        todo = [it for it in items if it["id"] not in done]
        summary = CollectSummary(path=path, total=total, skipped=total - len(todo), written=0, failed=0, retries=0)
        if not todo:
            return summary
        path.parent.mkdir(parents=True, exist_ok=True)
        errors_path = path.with_name(path.name + ".errors.jsonl")
        stop = threading.Event()
        with _Appender(path, durable) as writer, ThreadPoolExecutor(self.concurrency) as pool:
            pending: dict[Future, int] = {}  # request -> its budget estimate
            queue: Iterator[dict[str, Any]] = iter(todo)

            def fill() -> None:
                while not stop.is_set() and len(pending) < self.concurrency:
                    nxt = next(queue, None)
                    if nxt is None:
                        return
                    estimate = self.estimate_tokens(nxt) if budget is not None else 0
                    if budget is not None and (why := budget.reserve(estimate)) is not None:
                        if summary.stopped is None:
                            summary.stopped = why
                        stop.set()
                        return
                    pending[pool.submit(self._attempt, nxt)] = estimate

            fill()
            while pending:
                finished, _ = wait(set(pending), return_when=FIRST_COMPLETED)
                for f in finished:
                    estimate = pending.pop(f)
                    o: _Outcome = f.result()
                    if budget is not None:
                        budget.settle(estimate, _used_tokens(o.record) if o.record else None,
                                      answered=o.record is not None)
                    summary.retries += o.retries
                    if o.record is not None:
                        writer.write(o.record)
                        summary.written += 1
                        if progress is not None:
                            progress(summary.skipped + summary.written, total)
                    elif o.error is not None:
                        summary.failed += 1
                        with open(errors_path, "a") as ef:
                            ef.write(json.dumps({**o.error, "time": time.time()}) + "\n")
                    elif o.fatal and summary.stopped is None:
                        summary.stopped = o.fatal
                        stop.set()  # let the requests in flight finish (and be written), start no more
                fill()
        return summary


# -- helpers -----------------------------------------------------------------------------------------------------
def _normalise(prompts: Iterable[dict[str, Any] | str]) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    for i, p in enumerate(prompts):
        item = {"id": str(i), "prompt": p} if isinstance(p, str) else dict(p)
        if "id" not in item or item["id"] is None:
            item["id"] = str(i)
        item["id"] = str(item["id"])
        if "prompt" not in item and "messages" not in item:
            raise UserError(f"prompt record {item['id']!r} has neither 'prompt' nor 'messages'")
        if item["id"] in seen:
            continue  # the same id twice: asked once
        seen.add(item["id"])
        yield item


def _load_done_ids(path: Path) -> set[str]:
    """Ids already answered in ``path``; a torn last line (a kill mid-write) is cut off the file first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} line {n} is not a trace record: not resuming over a foreign file") from None
    return done


class _Appender:
    """Append JSON lines; each record is one write, flushed (and fsynced when ``durable``) before the next."""

    def __init__(self, path: Path, durable: bool):
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self._durable = durable

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._durable:
            os.fsync(self._f.fileno())

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _retry_after(headers) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _error_body(e) -> dict[str, Any]:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        return body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return {}


def _error_code(e) -> str | None:
    return getattr(e, "code", None) or _error_body(e).get("code")


def _error_message(e) -> str:
    return _error_body(e).get("message") or str(e)


def read_traces(path: str | Path) -> list[dict[str, Any]]:
    """The records of a collection (a torn last line is ignored)."""
    return read_jsonl(Path(path))


__all__ = ["APITeacher", "Budget", "CollectSummary", "CollectionStopped", "read_traces"]
