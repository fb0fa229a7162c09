"""The middleware in front of every route (:class:`GuardMiddleware`, pure ASGI): arrival time, the key, the body
cap, and the access log.

On the generation endpoints the key is checked from the headers *before a byte of the body is read*: a request
without a valid key is answered 401 (after ``auth_failure_delay_ms``; counted in the store's rejections, no ledger
row) and its connection closed, so an unauthenticated client cannot make the server buffer, parse or tokenize
anything. Then the body is read up to :data:`~distillarena.serve.errors.MAX_BODY_BYTES`, counting the bytes that
actually arrive (a chunked body has no ``Content-Length`` to trust): a larger one is answered 413 (a ledger row for
the key) as soon as the cap is passed, and its connection closed. The proven key goes to the route in the request's
scope. Other routes take no body: a declared one over the cap is refused, and one read past the cap ends as a
disconnect.

The access log (logger ``distillarena.serve.access``, which ``distillarena serve`` prints) writes the path without
its query string, so a key put in a URL is never logged; the ``Authorization`` header is never logged.
"""

from __future__ import annotations

import logging
import time

from distillarena.serve.errors import MAX_BODY_BYTES, ApiError
from distillarena.serve.state import GENERATION_PATHS, AppState, token_of

ACCESS_LOG = logging.getLogger("distillarena.serve.access")


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_big() -> ApiError:
    return ApiError(413, f"The request body is over {MAX_BODY_BYTES} bytes.", code="request_too_large")


class GuardMiddleware:
    def __init__(self, app, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = scope.setdefault("state", {})
        st["t0"] = time.perf_counter()
        st["arrived"] = time.time()
        status = [0]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guard(scope, receive, logged_send)
        finally:
            if ACCESS_LOG.isEnabledFor(logging.INFO):
                client = scope.get("client")
                who = f"{client[0]}:{client[1]}" if client else "-"
                ACCESS_LOG.info('%s - "%s %s HTTP/%s" %d %.0fms', who, scope.get("method"), scope.get("path"),
                                scope.get("http_version"), status[0], (time.perf_counter() - st["t0"]) * 1000)

    async def _guard(self, scope, receive, send):
        headers = scope.get("headers", [])
        declared = _declared_length(headers)
        endpoint = GENERATION_PATHS.get(scope.get("path", ""))
        if endpoint is None or scope.get("method") != "POST":
            if declared is not None and declared > MAX_BODY_BYTES:
                await _too_big().response(close=True)(scope, receive, send)
                return
            await self.app(scope, _capped(receive), send)
            return
        state = self.state
        ctx = state.context_of(scope, endpoint)
        try:
            key = await state.check_key(token_of(headers), endpoint, ctx)
        except ApiError as e:
            await e.response(ctx.request_id, close=True)(scope, receive, send)
            return
        scope["state"]["key"] = key
        if declared is not None and declared > MAX_BODY_BYTES:
            await (await state.fail(ctx, _too_big()))(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before its request was whole: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                resp = await state.fail(ctx, _too_big())
                resp.headers["connection"] = "close"
                await resp(scope, receive, send)
                return
        whole = bytes(body)
        del body
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _capped(receive):
    """``receive`` that ends as a disconnect once more than the cap has been read (for routes that take no body)."""
    read = [0]

    async def wrapped():
        message = await receive()
        if message["type"] == "http.request":
            read[0] += len(message.get("body", b""))
            if read[0] > MAX_BODY_BYTES:
                return {"type": "http.disconnect"}
        return message

    return wrapped


__all__ = ["ACCESS_LOG", "GuardMiddleware"]
