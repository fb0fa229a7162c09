"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): :class:`ApiError`, and the
middleware that stamps arrival times and refuses over-sized bodies. The app's exception handlers are
:mod:`distillarena.serve.routes.handlers`."""

from __future__ import annotations

import math
import time

from fastapi.responses import JSONResponse

from distillarena.serve.schemas import ErrorResponse
from distillarena.serve.store import Rejected

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


__all__ = ["ERROR_RESPONSES", "MAX_BODY_BYTES", "ApiError", "TimingMiddleware"]
