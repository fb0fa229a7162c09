"""``/health`` (no key) and ``/v1/models``."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request

from distillarena.serve.errors import ERROR_RESPONSES
from distillarena.serve.schemas import Health, ModelList
from distillarena.serve.state import BEARER, AppState


def add_routes(app: FastAPI, state: AppState) -> None:
    backend = state.backend

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        return {"status": "ok", "model": state.model_name, "queue": backend.queue_depth, "batches": backend.batches,
                "rows": backend.rows_sampled}

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, tags=["openai"],
             dependencies=[Depends(BEARER)])
    async def models(request: Request) -> dict:
        await state.authenticate(request, None)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "distillarena"}]}


__all__ = ["add_routes"]
