"""The API's routes, by concern: :mod:`.info` (``/health``, ``/v1/models``) and :mod:`.generation` (completions and
chat completions: :mod:`.plan` checks and tokenizes a request, :mod:`.respond` writes the answer or the stream)."""

from __future__ import annotations

from fastapi import FastAPI

from distillarena.serve.routes import generation, info
from distillarena.serve.state import AppState


def add_routes(app: FastAPI, state: AppState) -> None:
    """Every route, in the order of the OpenAPI document."""
    info.add_routes(app, state)
    generation.add_routes(app, state)


__all__ = ["add_routes"]
