"""The one table of serving backends: kind -> constructor from the serve config.

Adding a backend is one module implementing :class:`~distillarena.serve.backend.Backend` and one entry here. The
server (:func:`distillarena.serve.server.build_app`) and the test helpers (:mod:`distillarena.serve.testing`) build
theirs with :func:`load_backend`; the serve config has no field to choose one yet, so they get
:data:`DEFAULT_BACKEND`.
"""

from __future__ import annotations

from collections.abc import Callable

from distillarena.serve.backend import Backend
from distillarena.serve.config import ServeConfig
from distillarena.serve.engine import Engine

BackendFactory = Callable[[ServeConfig], Backend]

BACKENDS: dict[str, BackendFactory] = {
    "hf": Engine.from_config,  # the model in process (transformers), batched by one worker thread
}
DEFAULT_BACKEND = "hf"


def load_backend(cfg: ServeConfig, kind: str = DEFAULT_BACKEND) -> Backend:
    """The backend ``kind`` for ``cfg``: its model loaded, not started."""
    try:
        factory = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown serving backend {kind!r}; expected one of {', '.join(BACKENDS)}") from None
    return factory(cfg)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "BackendFactory", "load_backend"]
