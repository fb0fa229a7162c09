"""``/v1/completions`` and ``/v1/chat/completions``: the key, the request's checks (:mod:`.plan`), the reservation,
generation in the backend, settlement and the ledger row, then the answer (:mod:`.respond`).

Generation and settlement run in a task shielded from the request's cancellation, so a client that disconnects
mid-generation does not leak its reservation, and the ledger row is committed before the response (or the first
byte of the stream) is sent.
"""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from distillarena.core.errors import UserError
from distillarena.serve.backend import EngineClosed, GenResult, ServerMisconfigured
from distillarena.serve.errors import ERROR_RESPONSES, ApiError
from distillarena.serve.routes.plan import Plan, plan_request
from distillarena.serve.routes.respond import respond
from distillarena.serve.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from distillarena.serve.state import BEARER, AppState, RequestContext
from distillarena.serve.store import Rejected, Reservation


def add_routes(app: FastAPI, state: AppState) -> None:
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES, tags=["openai"],
              dependencies=[Depends(BEARER)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(state, request, body, chat=True)

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES, tags=["openai"],
              dependencies=[Depends(BEARER)])
    async def completions(body: CompletionRequest, request: Request):
        return await generate(state, request, body, chat=False)


async def generate(state: AppState, request: Request, body, *, chat: bool):
    """One generation request, counted as in flight in the backend (a batching hint) until it is answered."""
    with state.backend.tracking():
        return await _generate(state, request, body, chat=chat)


async def _generate(state: AppState, request: Request, body, *, chat: bool):
    ctx = state.context(request, "chat.completions" if chat else "completions")
    ctx.model = body.model if len(body.model) <= 200 else body.model[:200]
    ctx.stream = bool(body.stream)
    try:
        key = await state.authenticate(request, ctx)
    except ApiError as e:
        return e.response(ctx.request_id)
    try:
        plan = await run_in_threadpool(plan_request, state, body, key, chat, ctx)
        state.backend.check_policy(key.policy)
    except ApiError as e:
        return await state.fail(ctx, e)
    except ServerMisconfigured as e:
        return await state.fail(ctx, ApiError(500, str(e), type="server_error", code="server_misconfigured"))
    except Exception as e:  # noqa: BLE001 - a bug, but the request still gets its ledger row
        return await state.fail(ctx, ApiError(500, f"The server had an error while reading your request "
                                                   f"({type(e).__name__}).", type="server_error"))
    try:
        reservation = await run_in_threadpool(state.store.reserve, key.id, ctx.reserved)
    except Rejected as r:
        return await state.fail(ctx, ApiError.from_rejected(r))
    task = asyncio.ensure_future(_run_and_settle(state, ctx, plan, reservation))
    result = await asyncio.shield(task)
    if isinstance(result, ApiError):
        return result.response(ctx.request_id)
    return respond(state, ctx, plan, result)


async def _run_and_settle(state: AppState, ctx: RequestContext, plan: Plan,
                          reservation: Reservation) -> GenResult | ApiError:
    """Generate, then settle and write the ledger row; runs to the end even if the client goes away."""
    store = state.store
    try:
        result = await asyncio.wrap_future(state.backend.submit(plan.job))
    except Exception as e:  # noqa: BLE001 - turned into an error response after the reservation is returned
        err = _generation_error(e)
        await run_in_threadpool(store.settle, reservation, completion_tokens=0, prompt_tokens=0,
                                ledger=ctx.row(err.status, code=err.code or err.type), used=False)
        return err
    await run_in_threadpool(store.settle, reservation, completion_tokens=result.completion_tokens,
                            prompt_tokens=result.prompt_tokens,
                            ledger=ctx.row(200, completion_tokens=result.completion_tokens))
    return result


def _generation_error(e: Exception) -> ApiError:
    if isinstance(e, UserError):
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, EngineClosed):
        return ApiError(503, str(e), type="server_error", code="unavailable")
    return ApiError(500, f"The server had an error while generating ({type(e).__name__}: {e}).", type="server_error")


__all__ = ["add_routes", "generate"]
