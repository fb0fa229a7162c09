"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (also streamed), models, health.

Order of checks for a generation request, each answered in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``:

1. the key, from the headers, before the body is read (401 missing, malformed, unknown or wrong, answered after a
   delay, no ledger row, counted per minute; 403 revoked; 429 when too many unproven secrets wait for scrypt):
   :mod:`~distillarena.serve.guard`;
2. the body's size, counting the bytes that arrive (413 over 8 MiB, chunked included);
3. the body (400: unparseable or malformed JSON, wrong types, out-of-range values, unknown model, ``max_tokens``
   over the cap, a prompt over the context (bounded in bytes before it is tokenized), log-probs beyond what the
   key's policy reveals, sampling settings the key's policy does not allow, unsupported parameters);
4. the rate limit and the budgets (429, with ``Retry-After`` when waiting can help, ``x-should-retry: false``
   when the budget is spent);
5. generation in the backend (the batching engine); then the reservation is settled and the ledger row committed
   in one transaction, *before* the response is sent; a stream is billed its reservation and its row committed
   before its first byte, and the unused part refunded when it ends.

Every request to a generation endpoint made with an existing, proven key gets one ledger row, refused ones
included. A client that disconnects mid-generation does not leak its reservation: the generation and settlement run
in a task shielded from the request's cancellation.

**Token ids** (``return_tokens_as_token_ids: true``, vLLM's extension, both endpoints): revealed tokens and
alternatives are written ``token_id:<id>`` instead of their text, and the log-probs cover every generated token, the
EOS that ended the completion included (its text is empty), so a client can rebuild the exact sampled sequence.

Streaming (``stream: true``, chat and completions) is sent as server-sent events in OpenAI's chunk shapes, ending
with ``data: [DONE]``: each token as soon as it is sampled (the sampler's per-step callback, within the same batch
as everyone else's) and its text can no longer change.

Where it lives: :mod:`~distillarena.serve.state` (the backend, store and config the routes share; the key check and
ledger writes), :mod:`~distillarena.serve.errors` (the error shape, the middleware) and
:mod:`~distillarena.serve.routes` (the route and exception handlers, by concern); this module only puts them
together. The app sees its backend through :class:`~distillarena.serve.backend.Backend`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from distillarena import __version__
from distillarena.serve.backend import Backend
from distillarena.serve.config import ServeConfig
from distillarena.serve.errors import MAX_BODY_BYTES, ApiError
from distillarena.serve.guard import GuardMiddleware
from distillarena.serve.routes import add_routes
from distillarena.serve.routes.plan import MAX_STOP
from distillarena.serve.state import GENERATION_PATHS, AppState
from distillarena.serve.store import Store


def create_app(engine: Backend, store: Store, config: ServeConfig | None = None, *, manage: bool = True) -> FastAPI:
    """The FastAPI app over a (started or not) backend and a store. With ``manage`` the app's lifespan starts the
    backend and clears stale reservations at startup, and closes both at shutdown."""
    state = AppState(engine, store, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage:
            store.reset_reservations()
            engine.start()
        yield
        if manage:
            engine.close()
            store.close()
        else:
            store.flush_rejections()

    app = FastAPI(
        title="distillarena teacher API",
        version=__version__,
        description="An OpenAI-compatible API over a (defended) teacher, with keys, budgets and a ledger.",
        lifespan=lifespan,
    )
    app.add_middleware(GuardMiddleware, state=state)
    add_routes(app, state)
    return app


__all__ = ["GENERATION_PATHS", "MAX_BODY_BYTES", "MAX_STOP", "ApiError", "create_app"]
