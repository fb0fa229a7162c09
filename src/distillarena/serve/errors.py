"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): :class:`ApiError`, the app's
exception handlers, and the middleware that stamps arrival times and refuses over-sized bodies."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillarena.serve.schemas import ErrorResponse
from distillarena.serve.store import Rejected

if TYPE_CHECKING:
    from distillarena.serve.state import AppState

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}
MAX_BODY_BYTES = 8 * 2**20
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 403, 429, 500)}  # the routes' documented errors


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


class TimingMiddleware:
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


def validation_error(exc: RequestValidationError) -> ApiError:
    """A body FastAPI could not parse or validate, as a 400 naming the first problem."""
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
    return ApiError(400, message, param=param, code="invalid_value")


def add_error_handlers(app: FastAPI, state: AppState) -> None:
    """Every error in OpenAI's shape; a malformed body on a generation endpoint is authenticated (the key's error
    wins) and then gets its ledger row."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = validation_error(exc)
        endpoint = GENERATION_PATHS.get(request.url.path)
        if endpoint is None:
            return err.response()
        ctx = state.context(request, endpoint)
        try:
            await state.authenticate(request, ctx)
        except ApiError as auth:
            return auth.response(ctx.request_id)
        return await state.fail(ctx, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return ApiError(500, f"The server had an error while processing your request ({type(exc).__name__}).",
                        type="server_error").response()


__all__ = ["ERROR_RESPONSES", "GENERATION_PATHS", "MAX_BODY_BYTES", "ApiError", "TimingMiddleware",
           "add_error_handlers", "validation_error"]
