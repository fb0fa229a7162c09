"""The app's exception handlers: every error in OpenAI's shape (:class:`~distillarena.serve.errors.ApiError`)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillarena.serve.errors import ApiError
from distillarena.serve.state import AppState

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}


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


__all__ = ["GENERATION_PATHS", "add_error_handlers", "validation_error"]
