"""The API's state, apart from its routes: the backend, the store and the config (:class:`AppState`), and one
generation request on its way to its ledger row (:class:`RequestContext`), with the key check and the ledger
writes every route shares."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from distillarena.serve.backend import Backend
from distillarena.serve.config import PolicyConfig, ServeConfig
from distillarena.serve.errors import ApiError
from distillarena.serve.store import KeyRecord, Rejected, Store, parse_token

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
# the key, as the OpenAPI document describes it (checked by the guard middleware and AppState.authenticate)
BEARER = HTTPBearer(auto_error=False, description="an API key from `distillarena keys create`")


@dataclass
class RequestContext:
    """One generation request on its way through the checks; becomes its ledger row."""

    endpoint: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    defense: str | None = None
    model: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    n: int = 0
    reserved: int = 0

    def row(self, status: int, *, code: str | None = None, completion_tokens: int = 0) -> dict[str, Any]:
        return {"request_id": self.request_id, "key_id": self.key_id, "time": self.arrived,
                "endpoint": self.endpoint, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens, "reserved_tokens": self.reserved, "n": self.n,
                "defense": self.defense, "status": status, "error_code": code,
                "latency_ms": self.latency_ms(), "stream": int(self.stream)}

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0


def token_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of raw ASGI headers (a value that is not ``Bearer <token>`` is checked as a token)."""
    for name, value in headers:
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer":
                return text or None
            return token.strip() or None
    return None


def bearer_token(request: Request) -> str | None:
    return token_of(request.scope.get("headers", []))


class AppState:
    """What the routes share: the backend, the key store and ledger, the config, and the served model's name and
    creation time (fixed when the app is made)."""

    def __init__(self, backend: Backend, store: Store, config: ServeConfig | None = None):
        self.backend = backend
        self.store = store
        self.config = config or ServeConfig()
        self.model_name = backend.model_name
        self.created = int(time.time())
        # a prompt of more bytes than this has more tokens than the context holds (no token is longer than the
        # longest in the vocabulary): refused before it is tokenized
        self.max_prompt_bytes = backend.context_length * max((len(b) for b in backend.tokens.bytes), default=1)
        self._noise_keys: dict[bytes, bytes] = {}
        self.background: set[asyncio.Task] = set()  # stream settlements that outlive their request

    def context(self, request: Request, endpoint: str) -> RequestContext:
        """A new request's context, timed from its arrival (stamped by the middleware)."""
        return self.context_of(request.scope, endpoint)

    @staticmethod
    def context_of(scope: dict, endpoint: str) -> RequestContext:
        st = scope.get("state", {})
        ctx = RequestContext(endpoint=endpoint)
        ctx.t0 = st.get("t0", ctx.t0)
        ctx.arrived = st.get("arrived", ctx.arrived)
        ctx.request_id = st.setdefault("request_id", ctx.request_id)
        return ctx

    def noise_key(self, policy: PolicyConfig) -> bytes:
        ident = policy.noise_id()
        key = self._noise_keys.get(ident)
        if key is None:
            key = self._noise_keys[ident] = self.store.noise_key(policy)
        return key

    async def check_key(self, token: str | None, endpoint: str, ctx: RequestContext | None) -> KeyRecord:
        """The key of ``token``, or an :class:`ApiError`: 401 (counted in the store's rejections, no ledger row),
        403 revoked (a ledger row with ``ctx``), 429 (too many unproven secrets to verify now). A refused key is
        answered only after ``auth_failure_delay_ms``, so one connection cannot guess (or queue scrypt) fast."""
        try:
            if token is None or parse_token(token) is None:
                key = self.store.authenticate(token)  # refuses without touching the database
            else:
                key = await run_in_threadpool(self.store.authenticate, token)
        except Rejected as r:
            if r.status == 403 and r.key is not None and ctx is not None:
                ctx.key_id, ctx.defense = r.key.id, r.key.policy.label()
                await run_in_threadpool(self.store.record, ctx.row(r.status, code=r.code))
            else:
                self.store.count_rejection(endpoint, r.code or str(r.status))
            if self.config.auth_failure_delay_ms > 0:  # 401, 403, and 429 when too many secrets wait for scrypt
                await asyncio.sleep(self.config.auth_failure_delay_ms / 1000.0)
            raise ApiError.from_rejected(r) from None
        if ctx is not None:
            ctx.key_id, ctx.defense = key.id, key.policy.label()
        return key

    async def authenticate(self, request: Request, ctx: RequestContext | None, endpoint: str = "models") -> KeyRecord:
        """The request's key: the one the guard middleware proved (generation endpoints), else checked now."""
        key = request.scope.get("state", {}).get("key")
        if key is None:
            return await self.check_key(bearer_token(request), endpoint, ctx)
        if ctx is not None:
            ctx.key_id, ctx.defense = key.id, key.policy.label()
        return key

    async def fail(self, ctx: RequestContext, err: ApiError) -> JSONResponse:
        """Write the refused request's ledger row and answer ``err``."""
        await run_in_threadpool(self.store.record, ctx.row(err.status, code=err.code or err.type))
        return err.response(ctx.request_id)


__all__ = ["BEARER", "GENERATION_PATHS", "AppState", "RequestContext", "bearer_token", "token_of"]
