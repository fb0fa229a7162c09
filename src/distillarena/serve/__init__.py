"""A (defended) teacher behind an OpenAI-compatible API, with per-key defense policies, budgets, rate limits and
an SQLite ledger.

- :mod:`~distillarena.serve.config`: :class:`ServeConfig` (YAML) and :class:`PolicyConfig` (per key);
- :mod:`~distillarena.serve.store`: :class:`Store`, keys (salted scrypt hashes), exact budgets, rate limits, ledger;
- :mod:`~distillarena.serve.engine`: :class:`Engine`, the model and the batching worker over the project's sampler;
- :mod:`~distillarena.serve.app`: :func:`create_app`, the FastAPI app;
- :mod:`~distillarena.serve.server`: :func:`serve` and :class:`ServerThread` (uvicorn);
- :mod:`~distillarena.serve.cli`: ``serve``, ``keys`` and ``ledger`` subcommands.

Importing this package does not import FastAPI or uvicorn; the submodules that need them do.
"""

from distillarena.serve.config import BatchingConfig, KeyDefaults, PolicyConfig, ServeConfig, load_serve_config
from distillarena.serve.store import KeyRecord, Rejected, Reservation, Store

__all__ = ["BatchingConfig", "KeyDefaults", "KeyRecord", "PolicyConfig", "Rejected", "Reservation", "ServeConfig",
           "Store", "load_serve_config"]
