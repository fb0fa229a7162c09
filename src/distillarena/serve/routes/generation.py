"""``/v1/completions`` and ``/v1/chat/completions``: the key (proven by the guard middleware), the request's checks
(:mod:`.plan`), the reservation, generation in the backend, settlement and the ledger row, then the answer
(:mod:`.respond`).

Generation and settlement run in a task shielded from the request's cancellation, so a client that disconnects
mid-generation does not leak its reservation. A plain answer is settled (and its ledger row committed) before it is
sent. A stream waits for its first tokens; then its whole reservation is billed and its ledger row committed
(:meth:`~distillarena.serve.store.Store.begin_stream`) before its first byte, and when generation ends, what it did
not use is refunded and the row completed (:meth:`~distillarena.serve.store.Store.end_stream`), also if the client
has gone. A failure before the first token is an ordinary error response.
"""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from distillarena.core.errors import UserError
from distillarena.serve.backend import EngineClosed, GenResult, ServerMisconfigured
from distillarena.serve.errors import ERROR_RESPONSES, ApiError
from distillarena.serve.routes.plan import Plan, plan_request
from distillarena.serve.routes.respond import END, respond, stream_response
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
    endpoint = "chat.completions" if chat else "completions"
    ctx = state.context(request, endpoint)
    ctx.model = body.model if len(body.model) <= 200 else body.model[:200]
    ctx.stream = bool(body.stream)
    try:
        key = await state.authenticate(request, ctx, endpoint)
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
    if plan.stream:
        return await _stream(state, ctx, plan, reservation)
    task = asyncio.ensure_future(_run_and_settle(state, ctx, plan, reservation))
    result = await asyncio.shield(task)
    if isinstance(result, ApiError):
        return result.response(ctx.request_id)
    return respond(state, ctx, plan, result)


def _billed(plan: Plan, result: GenResult) -> int:
    return result.completion_tokens + (result.prompt_tokens if plan.bills_prompt else 0)


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
                            ledger=ctx.row(200, completion_tokens=result.completion_tokens),
                            billed=_billed(plan, result))
    return result


async def _stream(state: AppState, ctx: RequestContext, plan: Plan, reservation: Reservation):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    started = asyncio.Event()
    sent = [0]  # tokens handed to the stream (billed if generation fails mid-stream)

    def deliver(deltas) -> None:  # on the event loop
        queue.put_nowait(deltas)
        sent[0] += sum(len(d.token_ids) for d in deltas)
        started.set()

    plan.job.on_delta = lambda deltas: loop.call_soon_threadsafe(deliver, deltas)
    first: asyncio.Future = loop.create_future()
    task = asyncio.ensure_future(_stream_and_settle(state, ctx, plan, reservation, queue, started, first, sent))
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    err = await asyncio.shield(first)
    if err is not None:
        return err.response(ctx.request_id)
    return stream_response(state, ctx, plan, queue)


async def _stream_and_settle(state: AppState, ctx: RequestContext, plan: Plan, reservation: Reservation,
                             queue: asyncio.Queue, started: asyncio.Event, first: asyncio.Future,
                             sent: list[int]) -> None:
    """Wait for the first tokens (or the failure), bill the reservation and commit the row, let the response
    start; at the end refund the unused part and complete the row. Runs to the end even if the client goes away."""
    store = state.store
    done = asyncio.wrap_future(state.backend.submit(plan.job))
    waiting = asyncio.ensure_future(started.wait())
    await asyncio.wait({done, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if done.done() and done.exception() is not None:
        err = _generation_error(done.exception())
        await run_in_threadpool(store.settle, reservation, completion_tokens=0, prompt_tokens=0,
                                ledger=ctx.row(err.status, code=err.code or err.type), used=False)
        first.set_result(err)
        return
    try:
        row_id = await run_in_threadpool(store.begin_stream, reservation, prompt_tokens=ctx.prompt_tokens,
                                         ledger=ctx.row(200))
    except BaseException as e:
        first.set_result(ApiError(500, f"The server could not record the request ({type(e).__name__}).",
                                  type="server_error"))
        done.cancel()
        raise
    first.set_result(None)
    try:
        result = await done
    except Exception as e:  # noqa: BLE001 - the stream has started: it ends with an error event
        err = _generation_error(e)
        queue.put_nowait(err)
        billed = sent[0] + (ctx.prompt_tokens if plan.bills_prompt else 0)
        await run_in_threadpool(store.end_stream, reservation, row_id, completion_tokens=sent[0], billed=billed,
                                latency_ms=ctx.latency_ms(), status=err.status, error_code=err.code or err.type)
        return
    queue.put_nowait((END, result))
    await run_in_threadpool(store.end_stream, reservation, row_id, completion_tokens=result.completion_tokens,
                            billed=_billed(plan, result), latency_ms=ctx.latency_ms())


def _generation_error(e: BaseException) -> ApiError:
    if isinstance(e, UserError):
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, EngineClosed):
        return ApiError(503, str(e), type="server_error", code="unavailable")
    return ApiError(500, f"The server had an error while generating ({type(e).__name__}: {e}).", type="server_error")


__all__ = ["add_routes", "generate"]
