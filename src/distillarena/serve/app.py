"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (also streamed), models, health.

Order of checks for a generation request, each answered in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``:

1. the key (401 missing, malformed, unknown or wrong; 403 revoked), also when the body is malformed;
2. the body (400: malformed JSON, wrong types, out-of-range values, unknown model, ``max_tokens`` over the cap,
   prompt over the context, log-probs beyond what the key's policy reveals, unsupported parameters);
3. the rate limit and the budgets (429, with ``Retry-After`` when waiting can help, ``x-should-retry: false``
   when the budget is spent);
4. generation in the batching engine; then the reservation is settled and the ledger row committed in one
   transaction, *before* the response (or the first byte of the stream) is sent.

Every request to a generation endpoint gets one ledger row, rejected ones included (with the key's id when the
token names an existing key). A client that disconnects mid-generation does not leak its reservation: the
generation and settlement run in a task shielded from the request's cancellation.

**Token ids** (``return_tokens_as_token_ids: true``, vLLM's extension, both endpoints): revealed tokens and
alternatives are written ``token_id:<id>`` instead of their text, and the log-probs cover every generated token, the
EOS that ended the completion included (its text is empty), so a client can rebuild the exact sampled sequence.

Streaming (``stream: true``, chat and completions) is sent as server-sent events in OpenAI's chunk shapes, ending
with ``data: [DONE]``. The sampler has no per-token callback, so the whole completion is generated first and then
sent token by token: time to first token equals the full latency (see the report of issue 7).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillarena import __version__
from distillarena.core.errors import UserError
from distillarena.serve.config import ServeConfig
from distillarena.serve.engine import Engine, EngineClosed, GenJob, GenResult, GenSequence, ServerMisconfigured
from distillarena.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
)
from distillarena.serve.store import KeyRecord, Rejected, Store

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
MAX_BODY_BYTES = 8 * 2**20
MAX_STOP = 4
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 429, 500)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    @classmethod
    def from_rejected(cls, r: Rejected) -> ApiError:
        headers = {}
        if r.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(r.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(r.retry_after * 1000)))
        if r.should_retry is not None:
            headers["x-should-retry"] = "true" if r.should_retry else "false"
        return cls(r.status, r.message, type=r.type, code=r.code, headers=headers)

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class _Ctx:
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


@dataclass
class _Plan:
    job: GenJob
    stream: bool
    include_usage: bool
    chat: bool
    logprobs: int | None
    token_ids: bool = False  # name tokens token_id:<id> (and reveal the EOS too)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return value.strip() or None  # not a bearer token: checked (and refused) as a token
    return token.strip() or None


class _Timing:
    """Pure ASGI middleware: arrival time for latency, and a cap on the declared body size."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})["t0"] = time.perf_counter()
            scope["state"]["arrived"] = time.time()
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        too_big = int(value) > MAX_BODY_BYTES
                    except ValueError:
                        too_big = False
                    if too_big:
                        resp = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes").response()
                        await resp(scope, receive, send)
                        return
        await self.app(scope, receive, send)


def create_app(engine: Engine, store: Store, config: ServeConfig | None = None, *, manage: bool = True) -> FastAPI:
    """The FastAPI app over a (started or not) engine and a store. With ``manage`` the app's lifespan starts the
    engine and clears stale reservations at startup, and closes both at shutdown."""
    cfg = config or ServeConfig()
    model_name = engine.model_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage:
            store.reset_reservations()
            engine.start()
        yield
        if manage:
            engine.close()
            store.close()

    app = FastAPI(
        title="distillarena teacher API",
        version=__version__,
        description="An OpenAI-compatible API over a (defended) teacher, with keys, budgets and a ledger.",
        lifespan=lifespan,
    )
    app.add_middleware(_Timing)
    bearer = HTTPBearer(auto_error=False, description="an API key from `distillarena keys create`")

    def _ctx(request: Request, endpoint: str) -> _Ctx:
        st = request.scope.get("state", {})
        ctx = _Ctx(endpoint=endpoint)
        ctx.t0 = st.get("t0", ctx.t0)
        ctx.arrived = st.get("arrived", ctx.arrived)
        return ctx

    async def _authenticate(request: Request, ctx: _Ctx | None) -> KeyRecord:
        token = _bearer(request)
        try:
            key = await run_in_threadpool(store.authenticate, token)
        except Rejected as r:
            if ctx is not None:
                ctx.key_id = r.key.id if r.key is not None else None
                await run_in_threadpool(store.record, ctx.row(r.status, code=r.code))
            raise ApiError.from_rejected(r) from None
        if ctx is not None:
            ctx.key_id, ctx.defense = key.id, key.policy.label()
        return key

    async def _fail(ctx: _Ctx, err: ApiError) -> JSONResponse:
        await run_in_threadpool(store.record, ctx.row(err.status, code=err.code or err.type))
        return err.response(ctx.request_id)

    # -- error handlers ---------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            param, message = None, "We could not parse the JSON body of your request (it is not valid JSON)."
        else:
            param = ".".join(loc) or None
            message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        err = ApiError(400, message, param=param, code="invalid_value")
        endpoint = GENERATION_PATHS.get(request.url.path)
        if endpoint is None:
            return err.response()
        ctx = _ctx(request, endpoint)
        try:
            await _authenticate(request, ctx)
        except ApiError as auth:
            return auth.response(ctx.request_id)
        return await _fail(ctx, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return ApiError(500, f"The server had an error while processing your request ({type(exc).__name__}).",
                        type="server_error").response()

    # -- routes -------------------------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queue": engine.queue_depth, "batches": engine.batches,
                "rows": engine.rows_sampled}

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"],
             dependencies=[Depends(bearer)])
    async def models(request: Request) -> dict:
        await _authenticate(request, None)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "distillarena"}]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS, tags=["openai"],
              dependencies=[Depends(bearer)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate(request, body, chat=True)

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS, tags=["openai"],
              dependencies=[Depends(bearer)])
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(request, body, chat=False)

    # -- the generation path --------------------------------------------------------------------------------------
    async def _generate(request: Request, body, *, chat: bool):
        with engine.tracking():
            return await _generate_tracked(request, body, chat=chat)

    async def _generate_tracked(request: Request, body, *, chat: bool):
        ctx = _ctx(request, "chat.completions" if chat else "completions")
        ctx.model = body.model if len(body.model) <= 200 else body.model[:200]
        ctx.stream = bool(body.stream)
        try:
            key = await _authenticate(request, ctx)
        except ApiError as e:
            return e.response(ctx.request_id)
        try:
            plan = await run_in_threadpool(_plan, body, key, chat, ctx)
            engine.check_policy(key.policy)
        except ApiError as e:
            return await _fail(ctx, e)
        except ServerMisconfigured as e:
            return await _fail(ctx, ApiError(500, str(e), type="server_error", code="server_misconfigured"))
        except Exception as e:  # noqa: BLE001 - a bug, but the request still gets its ledger row
            return await _fail(ctx, ApiError(500, f"The server had an error while reading your request "
                                                  f"({type(e).__name__}).", type="server_error"))
        try:
            reservation = await run_in_threadpool(store.reserve, key.id, ctx.reserved)
        except Rejected as r:
            return await _fail(ctx, ApiError.from_rejected(r))
        task = asyncio.ensure_future(_run_and_settle(ctx, plan, reservation))
        result = await asyncio.shield(task)
        if isinstance(result, ApiError):
            return result.response(ctx.request_id)
        return _respond(ctx, plan, result)

    async def _run_and_settle(ctx: _Ctx, plan: _Plan, reservation) -> GenResult | ApiError:
        """Generate, then settle and write the ledger row; runs to the end even if the client goes away."""
        try:
            result = await asyncio.wrap_future(engine.submit(plan.job))
        except Exception as e:  # noqa: BLE001 - turned into an error response after the reservation is returned
            if isinstance(e, UserError):
                err = ApiError(400, str(e), code="invalid_value")
            elif isinstance(e, EngineClosed):
                err = ApiError(503, str(e), type="server_error", code="unavailable")
            else:
                err = ApiError(500, f"The server had an error while generating ({type(e).__name__}: {e}).",
                               type="server_error")
            await run_in_threadpool(store.settle, reservation, completion_tokens=0, prompt_tokens=0,
                                    ledger=ctx.row(err.status, code=err.code or err.type), used=False)
            return err
        await run_in_threadpool(store.settle, reservation, completion_tokens=result.completion_tokens,
                                prompt_tokens=result.prompt_tokens,
                                ledger=ctx.row(200, completion_tokens=result.completion_tokens))
        return result

    def _plan(body, key: KeyRecord, chat: bool, ctx: _Ctx) -> _Plan:
        """Check a request against the server's limits and the key's policy; tokenize it; size its reservation."""
        policy = key.policy
        bad = body.unsupported()
        if bad is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
        if body.model != model_name:
            raise ApiError(400, f"The model '{ctx.model}' does not exist. This server serves '{model_name}'.",
                           param="model", code="model_not_found")
        n = body.n or 1
        if n > cfg.max_n:
            raise ApiError(400, f"n is {n}, the most this server allows is {cfg.max_n}.", param="n",
                           code="invalid_value")
        stop = body.stop_list()
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise ApiError(400, f"stop must be at most {MAX_STOP} non-empty strings.", param="stop",
                           code="invalid_value")
        # what the client asks to see, against what the key's policy reveals
        if chat:
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs",
                               code="invalid_value")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            lp_param = "top_logprobs" if body.top_logprobs else "logprobs"
        else:
            logprobs, lp_param = body.logprobs, "logprobs"
        if logprobs is not None:
            if not policy.logprobs:
                raise ApiError(400, "This API key is not allowed log-probs.", param="logprobs",
                               code="logprobs_not_allowed")
            if logprobs > policy.max_top_logprobs:
                raise ApiError(400, f"{lp_param} is {logprobs}, this API key reveals at most "
                               f"{policy.max_top_logprobs} alternatives per token.", param=lp_param,
                               code="logprobs_not_allowed")
        # prompts
        if chat:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                prompts = [engine.chat_prompt(messages)]
            except UserError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_value") from None
            except Exception as e:  # noqa: BLE001 - a template that rejects these messages is the client's problem
                raise ApiError(400, f"The messages cannot be rendered with the model's chat template: {e}",
                               param="messages", code="invalid_value") from None
        else:
            prompts = _completion_prompts(body.prompt)
        if len(prompts) > cfg.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts in one request, the most is {cfg.max_prompts}.",
                           param="prompt", code="invalid_value")
        longest = max(len(p) for p in prompts)
        ctx.prompt_tokens, ctx.n = sum(len(p) for p in prompts), n
        ctx_len = engine.context_length
        if longest >= ctx_len:
            raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                           f"{longest}.", param="messages" if chat else "prompt", code="context_length_exceeded")
        asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        if asked is None:
            max_tokens = min(cfg.max_tokens_cap, ctx_len - longest if chat else cfg.default_max_tokens)
        else:
            max_tokens = asked
        if max_tokens > cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, the most this server allows is {cfg.max_tokens_cap}.",
                           param="max_tokens", code="invalid_value")
        if longest + max_tokens > ctx_len:
            raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                           f"{longest} and max_tokens asks for {max_tokens}. Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        ctx.reserved = max_tokens * n * len(prompts)
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        job = GenJob(prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                     top_p=None if body.top_p is None else float(body.top_p), stop=tuple(stop), seed=body.seed,
                     logprobs=logprobs, policy=policy, all_tokens=bool(body.return_tokens_as_token_ids))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Plan(job=job, stream=bool(body.stream), include_usage=include_usage, chat=chat, logprobs=logprobs,
                     token_ids=bool(body.return_tokens_as_token_ids))

    def _completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list = [prompt]
        elif not prompt:
            raise ApiError(400, "prompt is an empty list.", param="prompt", code="invalid_value")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if len(items) > cfg.max_prompts:
            raise ApiError(400, f"{len(items)} prompts in one request, the most is {cfg.max_prompts}.",
                           param="prompt", code="invalid_value")
        out = []
        for item in items:
            if isinstance(item, str):
                if len(item) > MAX_BODY_BYTES:
                    raise ApiError(400, "prompt too long", param="prompt", code="context_length_exceeded")
                ids = engine.encode(item)
            else:
                ids = list(item)
                if any(not 0 <= t < engine.vocab_size for t in ids):
                    raise ApiError(400, f"prompt has token ids outside [0, {engine.vocab_size}).", param="prompt",
                                   code="invalid_value")
            out.append(ids or [engine.start_token_id])
        return out

    # -- responses ----------------------------------------------------------------------------------------------
    def _respond(ctx: _Ctx, plan: _Plan, result: GenResult):
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        headers = {"x-request-id": ctx.request_id}
        base = {"id": ("chatcmpl-" if plan.chat else "cmpl-") + ctx.request_id, "created": int(ctx.arrived),
                "model": model_name, "system_fingerprint": f"fp_distillarena_{__version__}"}
        if not plan.stream:
            if plan.chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": s.text, "refusal": None},
                            "logprobs": None if plan.logprobs is None else
                            {"content": _chat_logprobs(plan, s, 0, _revealed(s)), "refusal": None},
                            "finish_reason": s.finish_reason} for i, s in enumerate(result.sequences)]
                body = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            else:
                choices = [{"index": i, "text": s.text,
                            "logprobs": None if plan.logprobs is None else
                            _completion_logprobs(plan, s, 0, _revealed(s)),
                            "finish_reason": s.finish_reason} for i, s in enumerate(result.sequences)]
                body = {**base, "object": "text_completion", "choices": choices, "usage": usage}
            return JSONResponse(body, headers=headers)
        return StreamingResponse(_stream(base, plan, result, usage), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    def _stream(base: dict, plan: _Plan, result: GenResult, usage: dict):
        obj = "chat.completion.chunk" if plan.chat else "text_completion"
        extra = {"usage": None} if plan.include_usage else {}

        def event(choices: list, **more) -> str:
            return "data: " + json.dumps({**base, "object": obj, "choices": choices, **extra, **more},
                                         ensure_ascii=False, allow_nan=False) + "\n\n"

        for i, s in enumerate(result.sequences):
            if plan.chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            for t in range(s.shown if plan.logprobs is None else _revealed(s)):
                end = s.offsets[t + 1] if t + 1 < s.shown else len(s.text)
                piece = s.text[s.offsets[t]:end] if t < s.shown else ""
                if plan.chat:
                    lp = None if plan.logprobs is None else \
                        {"content": _chat_logprobs(plan, s, t, t + 1), "refusal": None}
                    yield event([{"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}])
                else:
                    lp = None if plan.logprobs is None else _completion_logprobs(plan, s, t, t + 1)
                    yield event([{"index": i, "text": piece, "logprobs": lp, "finish_reason": None}])
            if plan.chat:
                yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": s.finish_reason}])
            else:
                yield event([{"index": i, "text": "", "logprobs": None, "finish_reason": s.finish_reason}])
        if plan.include_usage:
            yield "data: " + json.dumps({**base, "object": obj, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"

    def _revealed(s: GenSequence) -> int:
        """Tokens with revealed log-probs: those shown, or every generated one (token ids)."""
        return len(s.logprobs) if s.logprobs is not None else s.shown

    def _name(plan: _Plan, tid: int) -> str:
        return f"token_id:{tid}" if plan.token_ids else engine.tokens.strings[tid]

    def _token(plan: _Plan, tid: int) -> tuple[str, list[int]]:
        return _name(plan, tid), list(engine.tokens.bytes[tid])

    def _chat_logprobs(plan: _Plan, s: GenSequence, start: int, stop: int) -> list[dict]:
        out = []
        for t in range(start, stop):
            tok, raw = _token(plan, s.token_ids[t])
            alts = []
            for tid, v in (s.top[t] if s.top else []):
                atok, araw = _token(plan, tid)
                alts.append({"token": atok, "logprob": v, "bytes": araw})
            out.append({"token": tok, "logprob": s.logprobs[t], "bytes": raw, "top_logprobs": alts})
        return out

    def _completion_logprobs(plan: _Plan, s: GenSequence, start: int, stop: int) -> dict:
        tokens = [_name(plan, s.token_ids[t]) for t in range(start, stop)]
        top = None
        if s.top is not None:
            top = []
            for t in range(start, stop):
                alts: dict[str, float] = {}
                for tid, v in s.top[t]:  # best first; two ids with the same text keep the better one
                    alts.setdefault(_name(plan, tid), v)
                top.append(alts)
        offsets = [s.offsets[t] if t < s.shown else len(s.text) for t in range(start, stop)]
        return {"tokens": tokens, "token_logprobs": s.logprobs[start:stop], "top_logprobs": top,
                "text_offset": offsets}

    return app


__all__ = ["ApiError", "create_app"]
