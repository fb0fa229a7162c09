"""Running the API: :func:`serve` (the ``distillarena serve`` command, blocking) and :class:`ServerThread` (a real
uvicorn server in a background thread, on a free port: for tests, benchmarks and the game playing over HTTP).

uvicorn's own access log is off (it writes the query string, where a client may have put its key); the server
writes its own (:data:`distillarena.serve.guard.ACCESS_LOG`: method, path without the query, status, latency)."""

from __future__ import annotations

import logging
import sys
import threading
import time

import uvicorn

from distillarena.serve.app import create_app
from distillarena.serve.config import ServeConfig
from distillarena.serve.guard import ACCESS_LOG
from distillarena.serve.registry import load_backend
from distillarena.serve.store import Store


class ServerThread:
    """A uvicorn server for ``app`` in a daemon thread; ``port=0`` picks a free port (read it from :attr:`port`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                     lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread = threading.Thread(target=self.server.run, name="distillarena-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped before it started (is the port free?)")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return self.url + "/v1"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_app(cfg: ServeConfig, store: Store | None = None):
    """Load the teacher (and proxy) of ``cfg`` into its backend (:func:`~distillarena.serve.registry.load_backend`) and
    open its store; returns ``(app, backend, store)``."""
    backend = load_backend(cfg)
    store = store or Store(cfg.store_path(), synchronous=cfg.synchronous, kdf_share=cfg.auth_kdf_share)
    return create_app(backend, store, cfg), backend, store


def serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    app, backend, store = build_app(cfg)
    keys = store.list_keys()
    live = [k for k in keys if not k.revoked]
    for k in live:
        try:
            backend.check_policy(k.policy)
        except Exception as e:  # noqa: BLE001 - a warning; the key gets a clear 500 if it is used
            print(f"warning: key {k.id} ({k.name}): {e}")
    print(f"serving {backend.model_name} on http://{cfg.host}:{cfg.port}/v1 (store {store.path}, "
          f"{len(live)} active key(s){'' if live else ': create one with `distillarena keys create`'})", flush=True)
    if not ACCESS_LOG.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("INFO:     %(message)s"))
        ACCESS_LOG.addHandler(handler)
        ACCESS_LOG.setLevel(logging.INFO)
        ACCESS_LOG.propagate = False
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False,
                                  lifespan="on")).run()


__all__ = ["ServerThread", "build_app", "serve"]
