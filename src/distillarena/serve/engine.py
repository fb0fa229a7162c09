"""The Hugging Face serving backend (:class:`Engine`): the teacher (and proxy) in process, a queue, and one worker
thread that batches. It implements :class:`distillarena.serve.backend.Backend` (entry ``"hf"`` of
``serve.registry.BACKENDS``); the job and result types (:class:`GenJob`, :class:`GenResult`, ...) are the backend
module's, re-exported here.

One background thread owns the model. Requests (:class:`GenJob`) wait in a queue; the worker takes the oldest,
waits for others to arrive, and starts one batched sampler call (:func:`distillarena.decoding.sampler.sample_steps`)
for the oldest job and every queued job *compatible* with it, in arrival order, up to ``max_batch_size`` rows (a
job is ``prompts x n`` rows). Up to ``max_running`` batches generate at once, one step of each in turn: a request
that arrives while others generate starts its own batch once ``max_wait_ms`` have passed (or a batch's worth has
come) instead of waiting for them to finish, so its first token comes within a few steps. Each batch computes
exactly what a call of its own would; stateful processors (a proxy's KV cache) are separate instances per running
batch.

How long the first batch waits adapts to the load: the API layer tells the engine how many requests are inside it
(:meth:`Engine.tracking`: authenticating, tokenizing, queued, generating or answering), and the worker waits for
as many jobs as the peak of that number over the last second (at most ``max_batch_size`` rows), but never more
than ``max_wait_ms`` after the oldest arrived. So a lone client never waits, and 16 clients that resubmit as soon
as they are answered are sampled together instead of in the halves in which their requests come back.

The sampler takes one temperature, top-p,
stop list, processor chain and generator per call, so compatible means: same temperature, top_p, stop strings,
defense (kind and parameters) and kind of work (scoring prompts or not). ``max_tokens`` may differ: the batch runs
to the largest, and each row is cut at its own request's ``max_tokens`` (tokens past it are sampled, discarded, and
neither returned nor counted). Log-prob reveal may differ too: the sampler reveals the largest top-k asked for in
the batch and each row keeps its own k (top-k of a sorted top-k' is exact), then its key's policy adds noise and
rounds.

**Seeds.** A request with ``seed`` runs in a batch of its own (its ``n`` rows per prompt) with a generator seeded by
it, so the same request with the same seed gets the same tokens and the same revealed log-probs (also when other
clients are active). Requests without a seed share batches and draw from the worker's global generator.

**The same sampler call as in process.** A key's defense is built by
:func:`distillarena.defenses.policy.build_policy` from the key's ``defense`` and ``params``, and its chain is the
chain ``DecodingPolicy.sample`` runs (the defense's processors, then its temperature / top-k / top-p), followed by
the request's temperature and top_p where the policy allows them
(:meth:`~distillarena.serve.config.PolicyConfig.sampling_problem`; a job the policy does not allow fails with a
:class:`UserError`). A seeded ``/v1/completions`` request whose prompts are token ids, at temperature 1 with no
top_p, is therefore exactly the call ``DecodingPolicy.sample(model, ids, mask,
generator=torch.Generator().manual_seed(seed), ...)`` on those prompts left-padded together: the same tokens and
the same log-probs, bit for bit (for a key without reveal noise). The game relies on this to play over HTTP
(``distillarena.game.collect``).

**Reveal.** Log-probs are those of the key's policy's distribution (``reveal_from="processed"``: after the defense,
before the request's own temperature and top_p), whatever the request's sampling settings, greedy included; a
token that distribution excludes has log-prob -inf, which the API writes as -9999.0 (OpenAI's convention). Then the
key's reveal policy: Gaussian noise of ``noise_std``, a keyed function of (server secret, policy, context, token)
(:class:`~distillarena.defenses.reveal.KeyedNoise`: the same value every time the same token is revealed in the
same context, whichever request asks), then rounding.

**Output-level defenses** (``rewrites_text`` in the defense table: answer only, truncated or summarised reasoning,
paraphrase, poison): the batch is sampled at the policy's temperature / top-p, then each completion's text is
rewritten by the key's defense (seeded by the request's seed) and only the rewritten text and its tokens are
returned: such a key reveals no log-probs and takes no stream (the API refuses both, 400). The rewrite runs in the
worker thread once the batch's last step is sampled (a summary or paraphrase runs the proxy then; other running
batches wait for it).

**Streaming.** A job with ``on_delta`` is fed token by token from the sampler's per-step callback and gets each
sequence's tokens as soon as their text is settled (a piece that could still become a stop string is held back);
the batch is the same as without streaming. **Scoring.** A job with ``score`` first gets its prompts' own tokens
scored: the sampler forced along each prompt (``force``) with the policy's chain, one step per token, the same
computation generation makes, so a revealed value is the same whether a token was generated or scored.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import torch

from distillarena.core.errors import UserError
from distillarena.decoding import cut_at_stop_strings, model_vocab_size
from distillarena.decoding.sampler import SampleResult, SampleStep, sample_steps
from distillarena.defenses.reveal import KeyedNoise
from distillarena.defenses.rewrite import fit_tokens
from distillarena.defenses.spec import defense_spec
from distillarena.models.tokenizer import byte_level_decoder
from distillarena.serve.backend import (
    EngineClosed,
    GenJob,
    GenResult,
    GenSequence,
    ScoredPrompt,
    ServerMisconfigured,
    StreamDelta,
)
from distillarena.serve.config import GREEDY_BELOW, PolicyConfig, ServeConfig

NEG_INF_LOGPROB = -9999.0  # what OpenAI's API writes for a token with probability 0


class TokenTable:
    """Bytes and display string of every token id, and the text offsets of a generated sequence."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        n = len(tokenizer)
        decoder_added = getattr(tokenizer, "added_tokens_decoder", {})
        # what decode(skip_special_tokens=True) skips: the named special tokens and every added token marked special
        self.special = set(tokenizer.all_special_ids) | {i for i, t in decoder_added.items() if t.special}
        added = {i: t.content for i, t in decoder_added.items()}
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        table = byte_level_decoder()
        self.byte_level = "ByteLevel" in repr(decoder) and all(
            i in added or all(ch in table for ch in (p or "")) for i, p in enumerate(pieces))
        out: list[bytes] = []
        for i, p in enumerate(pieces):
            if i in added:
                out.append(added[i].encode())
            elif self.byte_level:
                out.append(bytes(table[ch] for ch in (p or "")))
            else:
                out.append(tokenizer.decode([i]).encode("utf-8", "replace"))
        out += [b""] * max(0, vocab_size - n)
        self.bytes = out
        self.strings = [b.decode("utf-8", "replace") for b in out]
        self.max_bytes = max((len(b) for b in out), default=1) or 1  # the longest token, in bytes

    def decode(self, ids: list[int]) -> tuple[str, list[int]]:
        """Text of ``ids`` (special tokens skipped, as ``decode(skip_special_tokens=True)``) and each token's start."""
        if not self.byte_level:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            offsets = [len(self.tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
            return text, [min(o, len(text)) for o in offsets]
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        offsets, length = [], 0
        for t in ids:
            offsets.append(length)
            if t in self.special:
                continue
            s = dec.decode(self.bytes[t])
            parts.append(s)
            length += len(s)
        parts.append(dec.decode(b"", final=True))
        return "".join(parts), offsets


class Engine:
    """The teacher, its tokenizer, the optional proxy, and the batching worker: the Hugging Face backend.

    Build it with :meth:`from_config` (loads from disk) or directly from objects; call :meth:`start` before
    :meth:`submit` and :meth:`close` at the end.
    """

    def __init__(self, model, tokenizer, *, model_name: str = "teacher", proxy=None, proxy_gradient: str | None = None,
                 antidistillation_method: str = "fd", max_batch_size: int = 16, max_wait_ms: float = 50.0,
                 proxy_tokenizer=None, max_running: int = 8, task=None):
        self.model = model.eval()
        self.task = task  # what output-level defenses read as reasoning and answer (None: the built-in task)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.proxy = None if proxy is None else proxy.eval()
        self.proxy_tokenizer = proxy_tokenizer  # None: the teacher's
        self.proxy_gradient = proxy_gradient
        self.antidistillation_method = antidistillation_method
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_running = int(max_running)
        self.vocab_size = model_vocab_size(model)
        self.tokens = TokenTable(tokenizer, self.vocab_size)
        ctx = getattr(model.config, "max_position_embeddings", None) or 2048
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < ctx:
            ctx = tok_max
        self.context_length = int(ctx)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self.start_token_id = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.eos_ids = _eos_ids(model)  # what the sampler stops on (the generation config's, else the config's)
        self._queue: queue.Queue[GenJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._policies: dict = {}
        self._noise_key = os.urandom(32)  # for jobs that bring no noise key (used directly, not through the API)
        self._active = 0  # requests inside the API layer (see tracking())
        self._peaks: deque[tuple[float, int]] = deque()
        self._active_lock = threading.Lock()
        self.batches = 0  # sampler calls made
        self.rows_sampled = 0

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Engine:
        from distillarena.models.presets import load_model, load_tokenizer

        path = cfg.model_path()
        model, tok = load_model(path), load_tokenizer(path)
        proxy = load_model(cfg.proxy) if cfg.proxy else None
        proxy_tok = load_tokenizer(cfg.proxy) if cfg.proxy else None
        if proxy is not None:
            from distillarena.defenses import check_same_vocabulary

            check_same_vocabulary(model_vocab_size(model), proxy, teacher_tokenizer=tok, proxy_tokenizer=proxy_tok)
        if cfg.proxy_gradient and proxy is None:
            raise UserError("proxy_gradient is set but proxy is not: antidistillation needs both")
        name = cfg.model_name or Path(path.rstrip("/")).name or "teacher"
        return cls(model, tok, model_name=name, proxy=proxy, proxy_gradient=cfg.proxy_gradient,
                   antidistillation_method=cfg.antidistillation_method,
                   max_batch_size=cfg.batching.max_batch_size, max_wait_ms=cfg.batching.max_wait_ms,
                   proxy_tokenizer=proxy_tok, max_running=cfg.batching.max_running, task=cfg.task.build())

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="distillarena-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- what the API layer needs ------------------------------------------------------------------------------
    def check_policy(self, policy: PolicyConfig) -> None:
        """Raise :class:`ServerMisconfigured` if this server cannot apply ``policy``."""
        if policy.needs_proxy and self.proxy is None:
            raise ServerMisconfigured(f"this key's defense ({policy.label()}) needs a proxy model, and the server "
                                      "was started without one (set `proxy:` in the serve config)")
        if defense_spec(policy.defense).needs_gradient and not self.proxy_gradient:
            raise ServerMisconfigured(f"this key's defense ({policy.defense}) needs a proxy gradient file, and the "
                                      "server was started without one (set `proxy_gradient:` in the serve config)")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("the served model's tokenizer has no chat template: use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    @contextlib.contextmanager
    def tracking(self):
        """Count one request as in flight for the duration of the block (the batching worker waits for as many
        jobs as were in flight at the peak of the last second)."""
        now = time.monotonic()
        with self._active_lock:
            self._active += 1
            self._peaks.append((now, self._active))
            while self._peaks and self._peaks[0][0] < now - 10.0:  # bounded, also when nobody asks
                self._peaks.popleft()
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1

    def expected_jobs(self, window: float = 1.0) -> int:
        """Peak number of requests in flight over the last ``window`` seconds (at least 1)."""
        now = time.monotonic()
        with self._active_lock:
            while self._peaks and self._peaks[0][0] < now - window:
                self._peaks.popleft()
            return max([self._active, 1] + [v for _, v in self._peaks])

    def submit(self, job: GenJob) -> Future:
        if self._closed or self._thread is None:
            raise EngineClosed("the engine is not running")
        self._queue.put(job)
        return job.future

    def generate(self, job: GenJob, timeout: float | None = None) -> GenResult:
        """Submit and wait (for callers outside an event loop)."""
        return self.submit(job).result(timeout)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: deque[GenJob] = deque()
        running: list[_Running] = []
        stopping = False
        while True:
            if not running and not pending:
                if stopping:
                    break
                job = self._queue.get()
                if job is None:
                    stopping = True
                    continue
                pending.append(job)
            stopping = self._drain(pending) or stopping
            if pending and len(running) < self.max_running:
                if not running:  # nothing to step meanwhile: wait for the requests in flight, as one batch
                    stopping = self._gather(pending, stopping) or stopping
                    start = True
                else:  # others are generating: start once enough have come, or the oldest has waited long enough
                    start = (stopping or sum(j.rows for j in pending) >= self.max_batch_size
                             or time.monotonic() >= pending[0].enqueued + self.max_wait)
                if start:
                    batch = self._take(pending)
                    if batch:
                        running.append(_Running(batch, self._work(batch)))
            for r in list(running):  # one step of every running batch
                if r.advance():
                    running.remove(r)
        while True:  # jobs that arrived after the sentinel
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed("the server is shutting down"))

    def _drain(self, pending: deque[GenJob]) -> bool:
        """Move what is queued into ``pending`` without waiting; True if the stop sentinel came."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)

    def _gather(self, pending: deque[GenJob], stopping: bool) -> bool:
        """Wait (until the oldest's deadline) for the jobs the requests in flight will bring; True if the stop
        sentinel came."""
        deadline = pending[0].enqueued + self.max_wait
        while not stopping and sum(j.rows for j in pending) < self.max_batch_size:
            # take what is already queued; wait (until the deadline) only while more are expected
            wait = deadline - time.monotonic() if len(pending) < self.expected_jobs() else 0.0
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stopping = True
            else:
                pending.append(job)
        return stopping

    def _take(self, pending: deque[GenJob]) -> list[GenJob]:
        """The oldest pending job and every pending job compatible with it, in arrival order, up to the batch size."""
        batch, rows = [], 0
        group = pending[0].group()
        for job in list(pending):
            if job.group() != group or (batch and rows + job.rows > self.max_batch_size):
                continue
            pending.remove(job)
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away before its turn
            batch.append(job)
            rows += job.rows
        return batch

    def _run(self, batch: list[GenJob]) -> None:
        """Run one batch to its end (the worker interleaves :meth:`_work` of several instead)."""
        r = _Running(batch, self._work(batch))
        while not r.advance():
            pass

    def _work(self, batch: list[GenJob]):
        """One batch, one sampler step per ``next``: scoring the prompts that ask for it, then generating; at the
        end each job's future gets its result."""
        scoring = [j for j in batch if j.score is not None]
        scored = (yield from self._score(scoring)) if scoring else {}
        generating = [j for j in batch if j.max_tokens > 0]
        results = (yield from self._sample(generating)) if generating else {}
        for job in batch:
            res = results.get(id(job)) or GenResult(sequences=[], prompt_tokens=sum(len(p) for p in job.prompts),
                                                    completion_tokens=0, batch_rows=0)
            res.scored = scored.get(id(job))
            job.future.set_result(res)

    def _checkout(self, policy: PolicyConfig):
        """An instance of the key's defense that no running batch uses (processors keep per-batch state, such as a
        proxy's KV cache), built by build_policy when none is free; give it back with :meth:`_checkin`."""
        from distillarena.defenses.policy import build_policy

        params = dict(policy.params)
        if defense_spec(policy.defense).needs_gradient:  # the gradient's method: the server's unless the key names one
            params.setdefault("method", self.antidistillation_method)
        key = (policy.defense, tuple(sorted(params.items())))
        free = self._policies.setdefault(key, [])
        if free:
            return key, free.pop()
        if self.task is None and defense_spec(policy.defense).rewrites_text:
            from distillarena.tasks.config import TaskConfig

            self.task = TaskConfig().build()
        return key, build_policy(policy.defense, params, teacher=self.model, tokenizer=self.tokenizer,
                                 proxy=self.proxy, proxy_tokenizer=self.proxy_tokenizer or self.tokenizer,
                                 gradient=self.proxy_gradient, task=self.task)

    def _checkin(self, key, built) -> None:
        self._policies.setdefault(key, []).append(built)

    @contextlib.contextmanager
    def policy_chain(self, policy: PolicyConfig):
        """The processors that turn the teacher's logits into the policy's distribution (what
        ``DecodingPolicy.sample`` runs: the defense's processors, then its temperature / top-k / top-p), reset and
        held for the block."""
        from distillarena.decoding.processors import sampling_warpers

        if policy.freedom == "open":
            yield []
            return
        self.check_policy(policy)
        key, dp = self._checkout(policy)
        try:
            for proc in dp.processors:
                if hasattr(proc, "reset"):
                    proc.reset()
            yield list(dp.processors) + sampling_warpers(dp.temperature, dp.top_k, dp.top_p)
        finally:
            self._checkin(key, dp)

    @staticmethod
    def sampling(policy: PolicyConfig, temperature: float, top_p: float | None) -> tuple[float, float | None]:
        """The sampler's ``(temperature, top_p)`` after the policy's chain for a request's settings: the request's
        where the policy allows them (0: greedy), a :class:`UserError` where it does not."""
        problem = policy.sampling_problem(temperature, top_p)
        if problem is not None:
            raise UserError(problem[1])
        top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
        if policy.freedom == "open":
            return (0.0 if temperature < GREEDY_BELOW else float(temperature)), top_p
        return float(temperature), None

    def _reveal(self, job: GenJob) -> _Reveal:
        return _Reveal(job.policy, job.noise_key or self._noise_key)

    def _sample(self, batch: list[GenJob]):
        """Generate a batch, one sampler step per ``next``; returns each job's :class:`GenResult` by ``id(job)``."""
        first = batch[0]
        prompts = [p for job in batch for p in job.prompts for _ in range(job.n)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        temperature, top_p = self.sampling(first.policy, first.temperature, first.top_p)
        want = [j.logprobs for j in batch if j.logprobs is not None]
        k_max = max(want, default=0)
        reveal = (k_max if k_max > 0 else _no_alternatives) if want else None
        generator = None
        if first.seed is not None:
            generator = torch.Generator().manual_seed(first.seed % 2**63)
        spans, start = [], 0
        for job in batch:
            rows = [_Row(job, i, p, self.tokens, self.eos_ids, self._reveal(job) if job.logprobs is not None else None,
                         stream=job.on_delta is not None)
                    for i, p in enumerate(p for p in job.prompts for _ in range(job.n))]
            spans.append((job, start, rows))
            start += len(rows)
        streaming = [sp for sp in spans if sp[0].on_delta is not None]

        def on_step(step: SampleStep) -> None:
            for job, a, rows in streaming:
                _feed_step(job, rows, step, a)
                deltas = [d for d in (r.take() for r in rows) if d is not None]
                if deltas:
                    job.on_delta(deltas)

        with self.policy_chain(first.policy) as processors:
            res = yield from sample_steps(
                self.model, ids, mask, max_new_tokens=max(j.max_tokens for j in batch), temperature=temperature,
                top_p=top_p, processors=processors, pad_token_id=self.pad_token_id, stop_strings=first.stop,
                tokenizer=self.tokenizer if first.stop else None, generator=generator, reveal=reveal,
                reveal_from="processed", on_step=on_step if streaming else None,
            )
        self.batches += 1
        self.rows_sampled += len(prompts)
        out: dict[int, GenResult] = {}
        for job, a, rows in spans:
            if job.on_delta is None:
                _feed_result(job, rows, res, a)
            for r in rows:
                r.close()
            if job.on_delta is not None:
                deltas = [d for d in (r.take() for r in rows) if d is not None]
                if deltas:
                    job.on_delta(deltas)
            seqs = [r.sequence() for r in rows]
            if job.policy.rewrites_text:
                seqs = self._rewrite(job, rows, seqs)
            out[id(job)] = GenResult(sequences=seqs, prompt_tokens=sum(len(p) for p in job.prompts),
                                     completion_tokens=sum(len(s.token_ids) for s in seqs), batch_rows=len(prompts))
        return out

    def _rewrite(self, job: GenJob, rows: list[_Row], seqs: list[GenSequence]) -> list[GenSequence]:
        """An output-level defense: each completion's text rewritten by the key's defense (seeded by the request's
        seed, as the in-process collection seeds each batch), its tokens those of the rewritten text (and the EOS if
        the teacher stopped on it); nothing else of the teacher's sequence is revealed."""
        if job.on_delta is not None or job.logprobs is not None:
            raise UserError(f"this key's defense ({job.policy.label()}) rewrites the text: no stream, no log-probs")
        key, dp = self._checkout(job.policy)
        try:
            seed = job.seed if job.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            prompts = [self.tokens.decode(r.prompt)[0] for r in rows]
            rewritten = dp.rewrite(prompts, [q.text for q in seqs], seed=seed)
        finally:
            self._checkin(key, dp)
        out = []
        for r, rw in zip(rows, rewritten, strict=True):
            eos = r.tokens[-1] if r.stopped and r.tokens and r.tokens[-1] in self.eos_ids else None
            text, ids, stopped = fit_tokens(rw.text, self.tokenizer, job.max_tokens, eos, ended=eos is not None)
            shown = len(ids) - (1 if stopped and eos is not None and ids and ids[-1] == eos else 0)
            offsets = self.tokens.decode(ids[:shown])[1]
            out.append(GenSequence(token_ids=ids, text=text, finish_reason="stop" if stopped else "length",
                                   shown=shown, offsets=offsets))
        return out

    def _score(self, batch: list[GenJob]):
        """Each prompt's own tokens scored under its job's policy: the sampler forced along the prompt, one step per
        ``next``; returns each job's :class:`ScoredPrompt` list by ``id(job)``."""
        policy = batch[0].policy
        prompts = [p for job in batch for p in job.prompts]
        longest = max(len(p) for p in prompts)
        res = None
        if longest > 1:
            ids = torch.tensor([[p[0]] for p in prompts], dtype=torch.long)
            force = torch.full((len(prompts), longest - 1), -1, dtype=torch.long)
            for i, p in enumerate(prompts):
                force[i, : len(p) - 1] = torch.tensor(p[1:], dtype=torch.long)
            k_max = max(j.score for j in batch)
            with self.policy_chain(policy) as processors:
                res = yield from sample_steps(
                    self.model, ids, torch.ones_like(ids), max_new_tokens=longest - 1, temperature=0.0,
                    processors=processors, pad_token_id=self.pad_token_id,
                    reveal=k_max if k_max > 0 else _no_alternatives, reveal_from="processed", force=force)
            self.batches += 1
            self.rows_sampled += len(prompts)
        out: dict[int, list[ScoredPrompt]] = {}
        row = 0
        for job in batch:
            reveal = self._reveal(job)
            scored = []
            for p in job.prompts:
                text, offsets = self.tokens.decode(p)
                lps: list[float | None] = [None]
                tops: list[list[tuple[int, float]] | None] = [None]
                m = len(p) - 1
                if m > 0 and res is not None:
                    chosen = res.reveal_logprobs[row, :m]
                    top_ids = res.top_ids[row, :m, : job.score] if job.score and res.top_ids is not None else None
                    top_vals = res.top_logprobs[row, :m, : job.score] if top_ids is not None else None
                    vals = reveal.values(chosen, top_vals, _context_noise(reveal, p[:1], p[1:], top_ids))
                    ids_list = top_ids.tolist() if top_ids is not None else [[] for _ in range(m)]
                    for v, ti in zip(vals, ids_list, strict=True):
                        lps.append(v[0])
                        tops.append(list(zip(ti, v[1:], strict=True)))
                scored.append(ScoredPrompt(token_ids=list(p), text=text, offsets=offsets, logprobs=lps, top=tops))
                row += 1
            out[id(job)] = scored
        return out


class _Running:
    """A batch being generated: its jobs and the generator that advances it one sampler step at a time."""

    def __init__(self, batch: list[GenJob], work):
        self.batch, self.work = batch, work

    def advance(self) -> bool:
        """One step; True when the batch is over (its futures are set, with results or with its error)."""
        try:
            next(self.work)
        except StopIteration:
            return True
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            for job in self.batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return True
        return False


def _eos_ids(model) -> set[int]:
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if v is not None:
            return {int(v)} if isinstance(v, int) else {int(x) for x in v}
    return set()


def _no_alternatives(logprobs: torch.Tensor) -> None:
    """A reveal policy that reveals no alternatives (the sampler still records each chosen token's value)."""
    return None


class _Reveal:
    """A key's reveal policy on raw values (float32): keyed noise, then rounding, then what JSON can carry."""

    def __init__(self, policy: PolicyConfig, noise_key: bytes):
        self.decimals = policy.decimals
        self.std = float(policy.noise_std)
        self.noise = KeyedNoise(noise_key) if self.std > 0 else None

    def values(self, chosen: torch.Tensor, top: torch.Tensor | None,
               eps: list[list[float]] | None) -> list[list[float]]:
        """Rows ``[chosen value, alternatives' values...]`` of ``chosen`` [N] and ``top`` [N, k] (None: k = 0),
        with ``eps`` [N][1 + k] standard normal noise (None: no noise)."""
        vals = chosen[:, None] if top is None else torch.cat([chosen[:, None], top], dim=-1)
        if eps is not None:
            vals = vals + torch.tensor(eps, dtype=torch.float32) * self.std
        if self.decimals is not None:
            vals = torch.round(vals, decimals=self.decimals)
        d = self.decimals
        return [[_finite(v, d) for v in row] for row in vals.tolist()]


def _context_noise(reveal: _Reveal, context: list[int], tokens: list[int], top_ids: torch.Tensor | None):
    """Noise of each of ``tokens`` (and its alternatives ``top_ids``) in the context of ``context`` followed by the
    tokens before it; None when the policy adds none."""
    if reveal.noise is None:
        return None
    d = KeyedNoise.context(context)
    ids = top_ids.tolist() if top_ids is not None else [[] for _ in tokens]
    out = []
    for y, alts in zip(tokens, ids, strict=True):
        out.append([reveal.noise.normal(d, y)] + [reveal.noise.normal(d, a) for a in alts])
        d = KeyedNoise.extend(d, y)
    return out


def _feed_step(job: GenJob, rows: list[_Row], step: SampleStep, start: int) -> None:
    """One sampler step into a job's rows (streaming)."""
    stop = start + len(rows)
    active = step.active[start:stop].tolist()
    live = [i for i, a in enumerate(active) if a and not rows[i].done]
    if not live:
        return
    tokens = step.tokens[start:stop].tolist()
    ended = step.ended[start:stop].tolist()
    vals = top_ids = None
    if job.logprobs is not None:
        idx = torch.tensor(live, dtype=torch.long) + start
        k = job.logprobs
        ids_t = step.top_ids[idx, :k] if k > 0 and step.top_ids is not None else None
        top = step.top_logprobs[idx, :k] if ids_t is not None else None
        reveal = rows[live[0]].reveal
        eps = None
        top_ids = ids_t.tolist() if ids_t is not None else [[] for _ in live]
        if reveal.noise is not None:
            eps = [[reveal.noise.normal(rows[i].digest, tokens[i])] + [reveal.noise.normal(rows[i].digest, a)
                                                                        for a in alts]
                   for i, alts in zip(live, top_ids, strict=True)]
        vals = reveal.values(step.reveal_logprobs[idx], top, eps)
    for j, i in enumerate(live):
        if vals is None:
            rows[i].add(tokens[i], None, None, ended[i])
        else:
            rows[i].add(tokens[i], vals[j][0], list(zip(top_ids[j], vals[j][1:], strict=True)), ended[i])


def _feed_result(job: GenJob, rows: list[_Row], res: SampleResult, start: int) -> None:
    """A finished sampler call into a job's rows (not streaming): the same values, row by row."""
    lengths, finished = res.lengths.tolist(), res.finished.tolist()
    for i, r in enumerate(rows):
        row = start + i
        m = min(int(lengths[row]), job.max_tokens)
        toks = res.tokens[row, :m].tolist()
        vals = top_ids = None
        if job.logprobs is not None:
            k = job.logprobs
            ids_t = res.top_ids[row, :m, :k] if k > 0 and res.top_ids is not None else None
            top = res.top_logprobs[row, :m, :k] if ids_t is not None else None
            top_ids = ids_t.tolist() if ids_t is not None else [[] for _ in range(m)]
            eps = _context_noise(r.reveal, r.prompt, toks, ids_t)
            vals = r.reveal.values(res.reveal_logprobs[row, :m], top, eps)
        for t in range(m):
            ended = bool(finished[row]) and t == int(lengths[row]) - 1
            if vals is None:
                r.add(toks[t], None, None, ended)
            else:
                r.add(toks[t], vals[t][0], list(zip(top_ids[t], vals[t][1:], strict=True)), ended)


class _Row:
    """One generated sequence assembled token by token: its text (cut at a stop string), the offset of each token,
    the revealed values, and, when streamed, what can be sent so far (:meth:`take`)."""

    def __init__(self, job: GenJob, index: int, prompt: list[int], table: TokenTable, eos: set[int],
                 reveal: _Reveal | None, stream: bool):
        self.job, self.index, self.prompt, self.table = job, index, prompt, table
        self.reveal, self.stream = reveal, stream
        self.eos = eos
        self.tokens: list[int] = []
        self.values: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.offsets: list[int] = []
        self.text = ""
        self.cut: int | None = None  # where the first stop string starts in `text`
        self.longest_stop = max((len(x) for x in job.stop), default=0)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace") if table.byte_level else None
        self.digest = KeyedNoise.context(prompt) if reveal is not None and reveal.noise is not None else None
        self.done = False
        self.stopped = False
        self.final: str | None = None
        self.shown = 0
        self.sent = 0  # tokens already given to the stream
        self.finished_sent = False

    def add(self, token: int, value: float | None, top: list[tuple[int, float]] | None, ended: bool) -> None:
        if self.done:
            return
        self.tokens.append(token)
        if value is not None:
            self.values.append(value)
            self.tops.append(top or [])
        if self.digest is not None:
            self.digest = KeyedNoise.extend(self.digest, token)
        if not (ended and token in self.eos) and self.dec is not None:
            self.offsets.append(len(self.text))
            if token not in self.table.special:
                before = len(self.text)
                self.text += self.dec.decode(self.table.bytes[token])
                self._find_stop(before)
        if ended:
            self.stopped = True
            self.close()
        elif len(self.tokens) >= self.job.max_tokens:
            self.close()

    def _find_stop(self, before: int) -> None:
        if self.cut is not None or not self.job.stop:
            return
        start = max(0, before - self.longest_stop + 1)
        hits = [i for i in (self.text.find(x, start) for x in self.job.stop) if i >= 0]
        if hits:
            self.cut = min(hits)

    def close(self) -> None:
        """The sequence has ended (or the batch has): settle its text."""
        if self.final is not None:
            return
        self.done = True
        if self.dec is not None:
            before = len(self.text)
            self.text += self.dec.decode(b"", final=True)
            self._find_stop(before)
            full, offsets = self.text, self.offsets
            text = full[: self.cut] if self.cut is not None else full
        else:  # not byte-level: decoded at the end, as the tokenizer decodes
            body = self.tokens[:-1] if (self.stopped and self.tokens and self.tokens[-1] in self.eos) else self.tokens
            full, offsets = self.table.decode(body)
            self.offsets = offsets
            text = cut_at_stop_strings(full, self.job.stop)
        if len(text) < len(full):
            self.stopped = True
        self.final = text
        self.shown = sum(1 for o in offsets if o < len(text))

    def sequence(self) -> GenSequence:
        text = self.final if self.final is not None else self.text
        seq = GenSequence(token_ids=self.tokens, text=text, finish_reason="stop" if self.stopped else "length",
                          shown=self.shown, offsets=self.offsets[: self.shown])
        if self.reveal is not None:
            m = len(self.tokens) if self.job.all_tokens else self.shown
            seq.logprobs = self.values[:m]
            seq.top = self.tops[:m]
        return seq

    def _held_back(self) -> int:
        """Characters at the end of the text that could still begin a stop string."""
        for n in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(x.startswith(tail) for x in self.job.stop):
                return n
        return 0

    def take(self) -> StreamDelta | None:
        """The tokens (and the finish) a stream may send now and has not sent yet."""
        if not self.stream or self.finished_sent:
            return None
        ids, pieces = [], []
        first = self.sent
        if self.final is None:
            if self.dec is None:
                return None
            safe = self.cut if self.cut is not None else len(self.text) - self._held_back()
            pending = bool(self.dec.getstate()[0])
            for t in range(self.sent, len(self.offsets)):
                begin = self.offsets[t]
                last = t + 1 == len(self.offsets)
                end = len(self.text) if last else self.offsets[t + 1]
                if (last and pending) or not (begin < safe and end <= safe):
                    break
                ids.append(self.tokens[t])
                pieces.append(self.text[begin:end])
            finish = None
        else:
            reveals_all = self.job.all_tokens and self.job.logprobs is not None
            upto = len(self.tokens) if reveals_all else self.shown
            for t in range(self.sent, upto):
                if t < self.shown:
                    end = self.offsets[t + 1] if t + 1 < self.shown else len(self.final)
                    pieces.append(self.final[self.offsets[t]:end])
                else:
                    pieces.append("")
                ids.append(self.tokens[t])
            finish = "stop" if self.stopped else "length"
            self.finished_sent = True
        self.sent += len(ids)
        if not ids and finish is None:
            return None
        delta = StreamDelta(index=self.index, token_ids=ids, pieces=pieces, finish_reason=finish)
        if self.reveal is not None:
            delta.logprobs = self.values[first: first + len(ids)]
            delta.top = self.tops[first: first + len(ids)]
        return delta


def _finite(v: float, decimals: int | None = None) -> float:
    """A revealed value as JSON can carry it: -inf (and anything below) as -9999.0, at most 0 (noise can push a
    log-prob above 0), rounded in decimal when the policy rounds."""
    v = min(0.0, max(NEG_INF_LOGPROB, float(v))) if v == v else NEG_INF_LOGPROB
    return round(v, decimals) if decimals is not None else v


__all__ = ["NEG_INF_LOGPROB", "Engine", "EngineClosed", "GenJob", "GenResult", "GenSequence", "ServerMisconfigured",
           "TokenTable"]
