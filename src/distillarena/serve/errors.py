"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): :class:`ApiError`. The app's
exception handlers are :mod:`distillarena.serve.routes.handlers`; the middleware that checks keys and body sizes
before anything else is :mod:`distillarena.serve.guard`."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from distillarena.serve.schemas import ErrorResponse
from distillarena.serve.store import Rejected

MAX_BODY_BYTES = 8 * 2**20
ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 403, 413, 429, 500)}  # the routes' documented errors


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

    def response(self, request_id: str | None = None, *, close: bool = False) -> JSONResponse:
        """The error as a response; ``close``: and the connection is closed after it (a body left unread)."""
        headers = dict(self.headers)
        if close:
            headers["connection"] = "close"
        if request_id:
            headers["x-request-id"] = request_id
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


__all__ = ["ERROR_RESPONSES", "MAX_BODY_BYTES", "ApiError"]
