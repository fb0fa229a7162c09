"""The API's handlers, by concern: :mod:`.handlers` (exceptions, in OpenAI's error shape), :mod:`.info`
(``/health``, ``/v1/models``) and :mod:`.generation` (completions and chat completions: :mod:`.plan` checks and
tokenizes a request, :mod:`.respond` writes the answer or the stream)."""

from __future__ import annotations

from fastapi import FastAPI

from distillarena.serve.routes import generation, handlers, info
from distillarena.serve.state import AppState


def add_routes(app: FastAPI, state: AppState) -> None:
    """The exception handlers, then every route (in the order of the OpenAPI document)."""
    handlers.add_error_handlers(app, state)
    info.add_routes(app, state)
    generation.add_routes(app, state)


__all__ = ["add_routes"]
