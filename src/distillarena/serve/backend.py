"""The seam between the HTTP API and what generates: the :class:`Backend` protocol and the job and result types
every backend speaks (the table of backends is :mod:`~distillarena.serve.registry`).

The API layer (:mod:`~distillarena.serve.app`, :mod:`~distillarena.serve.routes`), :mod:`~distillarena.serve.server`
and :mod:`~distillarena.serve.testing` see a backend only through :class:`Backend`. Today's one is the Hugging Face
backend, :class:`distillarena.serve.engine.Engine` (the model in process, a queue and one batching worker thread).

Adding a backend (a vLLM one, say): one module with a class that implements :class:`Backend` and a constructor from
the :class:`~distillarena.serve.config.ServeConfig`, and one entry in ``BACKENDS``
(:mod:`~distillarena.serve.registry`). It takes :class:`GenJob` (token-id prompts, sampling settings and the key's
:class:`~distillarena.serve.config.PolicyConfig`, whose defense it must apply as
:func:`distillarena.defenses.policy.build_policy` defines it, with the request's freedom that the policy's
docstring states) and answers each with a :class:`GenResult`; a job with ``on_delta`` also gets each sequence's
tokens as they are sampled (:class:`StreamDelta`), and a job with ``score`` the log-probs of its prompts' own tokens
(:class:`ScoredPrompt`).

Torch-free: importing this module does not import the HF backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from distillarena.serve.config import PolicyConfig


class EngineClosed(RuntimeError):
    """The backend is not running (not started, or shutting down): the API answers 503."""


class ServerMisconfigured(RuntimeError):
    """A key's policy needs something the server was started without (e.g. a proxy model)."""


@dataclass
class StreamDelta:
    """What a stream may send now of one sequence of a job: its next tokens (ids, text pieces and revealed values;
    a token's piece is sent once it can no longer change, nor be cut by a stop string), and its finish reason once
    it has ended (then its text pieces so far make up exactly :attr:`GenSequence.text`)."""

    index: int  # the sequence's index in the job (prompt-major, as GenResult.sequences)
    token_ids: list[int]
    pieces: list[str]
    logprobs: list[float] | None = None  # revealed values of these tokens (when the job asks for log-probs)
    top: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None


@dataclass
class GenJob:
    """One API request as the backend sees it: ``prompts`` (token ids), ``n`` samples of each."""

    prompts: list[list[int]]
    n: int
    max_tokens: int  # 0: nothing generated (a request that only scores its prompts)
    temperature: float
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and k alternatives
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    all_tokens: bool = False  # reveal every generated token (the EOS too), not only those whose text is shown
    score: int | None = None  # None: no; k >= 0: the log-prob of each prompt token (after the first) and k alternatives
    noise_key: bytes | None = None  # key of the reveal noise (the server's secret and the policy); None: the backend's
    on_delta: Callable[[list[StreamDelta]], None] | None = None  # called from the backend's thread as tokens come
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.prompts) * (self.n if self.max_tokens > 0 else 0) + (len(self.prompts) if self.score
                                                                            is not None else 0)

    def group(self) -> tuple:
        top_p = None if self.top_p is None or self.top_p >= 1.0 else float(self.top_p)
        alone = id(self) if self.seed is not None else None
        return (float(self.temperature), top_p, self.stop, self.policy.label(), self.score is not None, alone)


@dataclass
class ScoredPrompt:
    """A prompt's own tokens with the revealed log-prob of each under the key's policy given the tokens before it
    (``None`` for the first, which has no context) and its revealed alternatives."""

    token_ids: list[int]
    text: str
    offsets: list[int]  # start of each token in `text`
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class GenSequence:
    """One generated completion."""

    token_ids: list[int]  # every generated token counted (up to max_tokens, including an EOS)
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    shown: int  # the first `shown` tokens are those whose text is in `text` (EOS, and what a stop string cut, are not)
    offsets: list[int]  # start of each shown token in `text`
    logprobs: list[float] | None = None  # revealed log-prob of each shown token (each token, with all_tokens)
    top: list[list[tuple[int, float]]] | None = None  # revealed alternatives of the same tokens


@dataclass
class GenResult:
    sequences: list[GenSequence]  # prompt-major: prompt i, sample j is at i * n + j
    prompt_tokens: int
    completion_tokens: int
    batch_rows: int  # rows in the sampler call that produced it (for tests and benchmarks)
    scored: list[ScoredPrompt] | None = None  # one per prompt, when the job scores them


class TokenNames(Protocol):
    """How the API writes a token id: its display string and its bytes (indexed by id, the whole vocabulary)."""

    @property
    def strings(self) -> Sequence[str]: ...

    @property
    def bytes(self) -> Sequence[bytes]: ...


class Backend(Protocol):
    """What the API, the server and the test helpers use of a serving backend."""

    @property
    def model_name(self) -> str:
        """The id clients pass as ``model``."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are ``[0, vocab_size)``."""
        ...

    @property
    def context_length(self) -> int:
        """Prompt plus completion tokens at most."""
        ...

    @property
    def start_token_id(self) -> int:
        """The prompt of an empty completions prompt."""
        ...

    @property
    def tokens(self) -> TokenNames:
        """Every token's display string and bytes (their longest bounds how long a prompt can be)."""
        ...

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (``/health``)."""
        ...

    @property
    def batches(self) -> int:
        """Sampler calls made (``/health``, tests and benchmarks)."""
        ...

    @property
    def rows_sampled(self) -> int:
        """Rows sampled in all (``/health``)."""
        ...

    def start(self) -> Backend: ...

    def close(self) -> None: ...

    def check_policy(self, policy: PolicyConfig) -> None:
        """Raise :class:`ServerMisconfigured` if this backend cannot apply ``policy``."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (:class:`UserError` if it has none)."""
        ...

    def tracking(self) -> AbstractContextManager[None]:
        """Count one request as in flight for the duration of the block (a hint for batching)."""
        ...

    def submit(self, job: GenJob) -> Future[GenResult]:
        """Queue ``job``; the future ends with its :class:`GenResult` or its error (:class:`EngineClosed` when the
        backend is not running, :class:`~distillarena.core.errors.UserError` for the client's mistakes)."""
        ...


__all__ = ["Backend", "EngineClosed", "GenJob", "GenResult", "GenSequence", "ScoredPrompt", "ServerMisconfigured",
           "StreamDelta", "TokenNames"]
