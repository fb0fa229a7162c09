"""The API's state, apart from its routes: the backend, the store and the config (:class:`AppState`), and one
generation request on its way to its ledger row (:class:`RequestContext`), with the key check and the ledger
writes every route shares."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from distillarena.serve.backend import Backend
from distillarena.serve.config import ServeConfig
from distillarena.serve.errors import ApiError
from distillarena.serve.store import KeyRecord, Rejected, Store

# the key, as the OpenAPI document describes it (the routes check it themselves, see AppState.authenticate)
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
                "latency_ms": (time.perf_counter() - self.t0) * 1000.0, "stream": int(self.stream)}


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return value.strip() or None  # not a bearer token: checked (and refused) as a token
    return token.strip() or None


class AppState:
    """What the routes share: the backend, the key store and ledger, the config, and the served model's name and
    creation time (fixed when the app is made)."""

    def __init__(self, backend: Backend, store: Store, config: ServeConfig | None = None):
        self.backend = backend
        self.store = store
        self.config = config or ServeConfig()
        self.model_name = backend.model_name
        self.created = int(time.time())

    def context(self, request: Request, endpoint: str) -> RequestContext:
        """A new request's context, timed from its arrival (stamped by the middleware)."""
        st = request.scope.get("state", {})
        ctx = RequestContext(endpoint=endpoint)
        ctx.t0 = st.get("t0", ctx.t0)
        ctx.arrived = st.get("arrived", ctx.arrived)
        return ctx

    async def authenticate(self, request: Request, ctx: RequestContext | None) -> KeyRecord:
        """The request's key, or an :class:`ApiError` (401 / 403); with ``ctx``, a refusal gets its ledger row and
        an accepted key is written into ``ctx``."""
        token = bearer_token(request)
        try:
            key = await run_in_threadpool(self.store.authenticate, token)
        except Rejected as r:
            if ctx is not None:
                ctx.key_id = r.key.id if r.key is not None else None
                await run_in_threadpool(self.store.record, ctx.row(r.status, code=r.code))
            raise ApiError.from_rejected(r) from None
        if ctx is not None:
            ctx.key_id, ctx.defense = key.id, key.policy.label()
        return key

    async def fail(self, ctx: RequestContext, err: ApiError) -> JSONResponse:
        """Write the refused request's ledger row and answer ``err``."""
        await run_in_threadpool(self.store.record, ctx.row(err.status, code=err.code or err.type))
        return err.response(ctx.request_id)


__all__ = ["BEARER", "AppState", "RequestContext", "bearer_token"]
