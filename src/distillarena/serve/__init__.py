"""A (defended) teacher behind an OpenAI-compatible API, with per-key defense policies, budgets, rate limits and
an SQLite ledger.

- :mod:`~distillarena.serve.config`: :class:`ServeConfig` (YAML) and :class:`PolicyConfig` (per key: its defense,
  what a request may change of it, what is revealed);
- :mod:`~distillarena.serve.store`: :class:`Store`, keys (salted scrypt hashes), exact budgets, rate limits, ledger,
  counts of key-less refusals, the noise secret;
- :mod:`~distillarena.serve.backend`: the :class:`Backend` protocol a model server implements, and its job types;
- :mod:`~distillarena.serve.registry`: ``BACKENDS``, the table of backends by name (``hf``: the engine below);
- :mod:`~distillarena.serve.engine`: :class:`Engine`, the Hugging Face backend (batching worker over the sampler);
- :mod:`~distillarena.serve.app`: :func:`create_app`, the FastAPI app: state (:mod:`~distillarena.serve.state`),
  errors (:mod:`~distillarena.serve.errors`), the middleware that checks keys and body sizes before anything is
  read (:mod:`~distillarena.serve.guard`), routes (:mod:`~distillarena.serve.routes`);
- :mod:`~distillarena.serve.server`: :func:`serve` and :class:`ServerThread` (uvicorn);
- :mod:`~distillarena.serve.cli`: ``serve``, ``keys`` and ``ledger`` subcommands.

Importing this package does not import FastAPI or uvicorn; the submodules that need them do.
"""

from distillarena.serve.config import BatchingConfig, KeyDefaults, PolicyConfig, ServeConfig, load_serve_config
from distillarena.serve.store import KeyRecord, Rejected, Reservation, Store

__all__ = ["BatchingConfig", "KeyDefaults", "KeyRecord", "PolicyConfig", "Rejected", "Reservation", "ServeConfig",
           "Store", "load_serve_config"]
