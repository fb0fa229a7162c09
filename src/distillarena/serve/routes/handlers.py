"""The app's exception handlers: every error in OpenAI's shape (:class:`~distillarena.serve.errors.ApiError`).

A body the generation endpoints cannot parse (not JSON, not UTF-8, an integer of thousands of digits, nesting too
deep) or validate is a 400 with a code (``invalid_json``, ``invalid_value``), written to the key's ledger like any
other refusal (the key was proven before the body was read). ``param`` names the field as the API names it
(``messages[0].content``), never the validator's internals."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distillarena.serve.errors import ApiError
from distillarena.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions, TextPart
from distillarena.serve.state import GENERATION_PATHS, AppState

# every field name of the request bodies: what a validation error's location may name (the rest of a pydantic
# location, such as "function-after[_utf8(), str]" or "list[int]", is the validator's, not the API's)
_FIELDS = frozenset(name for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
                    for name in model.model_fields)


def api_param(loc) -> str | None:
    """A pydantic location as the API names the parameter: ``("body", "messages", 0, "content", "str")`` ->
    ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            if out:
                out += f"[{part}]"
        elif part in _FIELDS:
            out += ("." if out else "") + part
    return out or None


def unparseable(detail: str = "") -> ApiError:
    return ApiError(400, "We could not parse the JSON body of your request" + (f" ({detail})." if detail else "."),
                    code="invalid_json")


def validation_error(exc: RequestValidationError) -> ApiError:
    """A body FastAPI could not parse or validate, as a 400 naming the first problem."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        return unparseable("it is not valid JSON")
    param = api_param(first.get("loc", ()))
    message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param=param, code="invalid_value")


def add_error_handlers(app: FastAPI, state: AppState) -> None:
    """Every error in OpenAI's shape; a generation request's refusal gets its ledger row (its key was proven by the
    guard middleware before its body was read)."""

    async def refuse(request: Request, err: ApiError):
        endpoint = GENERATION_PATHS.get(request.url.path)
        if endpoint is None or request.method != "POST":
            return err.response()
        ctx = state.context(request, endpoint)
        try:
            await state.authenticate(request, ctx, endpoint)
        except ApiError as auth:
            return auth.response(ctx.request_id)
        return await state.fail(ctx, err)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await refuse(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and request.url.path in GENERATION_PATHS:
            # FastAPI's "There was an error parsing the body": not UTF-8, an integer too long, nesting too deep
            cause = exc.__cause__
            return await refuse(request, unparseable(type(cause).__name__ if cause is not None else ""))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return ApiError(500, f"The server had an error while processing your request ({type(exc).__name__}).",
                        type="server_error").response()


__all__ = ["GENERATION_PATHS", "add_error_handlers", "api_param", "validation_error"]
