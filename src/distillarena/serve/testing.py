"""Helpers to run a real server on a small model: for tests, benchmarks and the game playing over HTTP.

``running_server`` starts uvicorn on 127.0.0.1 and a free port, over a model folder, and stops it at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distillarena.serve.backend import Backend
from distillarena.serve.config import ServeConfig
from distillarena.serve.registry import load_backend
from distillarena.serve.server import ServerThread
from distillarena.serve.store import Store

FAST_KDF = "scrypt:1024:8:1"  # cheap key hashing for tests (the default is scrypt n=2**14)


def post_raw(base_url: str, path: str, body: dict | None, token: str | None = None, raw: bytes | None = None,
             headers: dict | None = None, timeout: float = 120) -> tuple[int, dict[str, str], str]:
    """A raw JSON POST as a client would send it (or the bytes ``raw``): (status, lower-cased headers, body text),
    error statuses included."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base_url + path, data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    return status, {k.lower(): v for k, v in hdrs.items()}, text


def save_tiny_model(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A freshly initialised preset with the built-in tokenizer, saved as a plain Hugging Face folder."""
    from distillarena.models.presets import build_preset
    from distillarena.models.tokenizer import task_tokenizer

    path = Path(path)
    tok = task_tokenizer()
    build_preset(preset, tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@dataclass
class RunningServer:
    thread: ServerThread
    engine: Backend  # the server's backend (the Hugging Face one: distillarena.serve.engine.Engine)
    store: Store
    config: ServeConfig

    @property
    def base_url(self) -> str:
        return self.thread.base_url

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def backend(self) -> Backend:
        return self.engine

    @property
    def model(self) -> str:
        return self.engine.model_name


@contextlib.contextmanager
def running_server(config: ServeConfig, *, kdf: str | None = FAST_KDF) -> Iterator[RunningServer]:
    """Load ``config``'s model, open its store and serve on 127.0.0.1 (``config.port``, 0: a free port)."""
    from distillarena.serve.app import create_app

    engine = load_backend(config)
    store = Store(config.store_path(), synchronous=config.synchronous, kdf=kdf, kdf_share=config.auth_kdf_share)
    app = create_app(engine, store, config)
    thread = ServerThread(app, host=config.host, port=config.port)
    thread.start()
    try:
        yield RunningServer(thread, engine, store, config)
    finally:
        thread.stop()
        engine.close()
        store.close()


__all__ = ["FAST_KDF", "RunningServer", "running_server", "save_tiny_model"]
