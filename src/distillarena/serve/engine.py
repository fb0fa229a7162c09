"""The Hugging Face serving backend (:class:`Engine`): the teacher (and proxy) in process, a queue, and one worker
thread that batches. It implements :class:`distillarena.serve.backend.Backend` (entry ``"hf"`` of
``serve.registry.BACKENDS``); the job and result types (:class:`GenJob`, :class:`GenResult`, ...) are the backend
module's, re-exported here.

One background thread owns the model. Requests (:class:`GenJob`) wait in a queue; the worker takes the oldest,
waits for others to arrive, and runs one batched :func:`distillarena.decoding.sample` call for the oldest job and
every queued job *compatible* with it, in arrival order, up to ``max_batch_size`` rows (a job is ``prompts x n``
rows).

How long it waits adapts to the load: the API layer tells the engine how many requests are inside it
(:meth:`Engine.tracking`: authenticating, tokenizing, queued, generating or answering), and the worker waits for
as many jobs as the peak of that number over the last second (at most ``max_batch_size`` rows), but never more
than ``max_wait_ms`` after the oldest arrived. So a lone client never waits, and 16 clients that resubmit as soon
as they are answered are sampled together instead of in the halves in which their requests come back.

The sampler takes one temperature, top-p,
stop list, processor chain and generator per call, so compatible means: same temperature, top_p, stop strings and
defense (kind and parameters). ``max_tokens`` may differ: the batch runs to the largest, and each row is cut at its
own request's ``max_tokens`` (tokens past it are sampled, discarded, and neither returned nor counted). Log-prob
reveal may differ too: the sampler reveals the largest top-k asked for in the batch and each row keeps its own k
(top-k of a sorted top-k' is exact), then its key's policy adds noise and rounds.

**Seeds.** A request with ``seed`` runs in a batch of its own (its ``n`` rows per prompt) with a generator seeded by
it, so the same request with the same seed gets the same tokens and the same revealed log-probs (also when other
clients are active). Requests without a seed share batches and draw from the worker's global generator.

**The same sampler call as in process.** A key's defense is built by
:func:`distillarena.defenses.policy.build_policy` from the key's ``defense`` and ``params``, and its chain is the
chain ``DecodingPolicy.sample`` runs (the defense's processors, then its temperature / top-k / top-p), followed by
the request's temperature and top_p. A seeded ``/v1/completions`` request whose prompts are token ids, at
temperature 1 with no top_p, is therefore exactly the call ``DecodingPolicy.sample(model, ids, mask,
generator=torch.Generator().manual_seed(seed), ...)`` on those prompts left-padded together: the same tokens and
the same log-probs, bit for bit. The game relies on this to play over HTTP (``distillarena.game.collect``).

**Reveal.** Log-probs are those of the distribution actually sampled (after the key's defense and the request's
temperature / top_p), as the sampler records them; a token that distribution excludes has log-prob -inf, which the
API writes as -9999.0 (OpenAI's convention). For greedy requests (temperature 0) the chosen token's log-prob is its
log-prob under the processed scores (no temperature), not 0.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import torch

from distillarena.core.errors import UserError
from distillarena.decoding import cut_at_stop_strings, model_vocab_size, sample
from distillarena.defenses.spec import defense_spec
from distillarena.serve.backend import EngineClosed, GenJob, GenResult, GenSequence, ServerMisconfigured
from distillarena.serve.config import PolicyConfig, ServeConfig

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
        table = _byte_decoder()
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


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the alphabet of byte-level BPE tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Engine:
    """The teacher, its tokenizer, the optional proxy, and the batching worker: the Hugging Face backend.

    Build it with :meth:`from_config` (loads from disk) or directly from objects; call :meth:`start` before
    :meth:`submit` and :meth:`close` at the end.
    """

    def __init__(self, model, tokenizer, *, model_name: str = "teacher", proxy=None, proxy_gradient: str | None = None,
                 antidistillation_method: str = "fd", max_batch_size: int = 16, max_wait_ms: float = 50.0,
                 proxy_tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.proxy = None if proxy is None else proxy.eval()
        self.proxy_tokenizer = proxy_tokenizer  # None: the teacher's
        self.proxy_gradient = proxy_gradient
        self.antidistillation_method = antidistillation_method
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
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
        self._queue: queue.Queue[GenJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._policies: dict = {}
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
                   proxy_tokenizer=proxy_tok)

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
        stopping = False
        while not stopping or pending:
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
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
            if batch:
                self._run(batch)
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed("the server is shutting down"))
        while True:  # jobs that arrived after the sentinel
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed("the server is shutting down"))

    def _run(self, batch: list[GenJob]) -> None:
        try:
            results = self._sample(batch)
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            for job in batch:
                job.future.set_exception(e)
            return
        for job, res in zip(batch, results, strict=True):
            job.future.set_result(res)

    def _decoding_policy(self, policy: PolicyConfig):
        """The key's defense, built once per (kind, params) by build_policy (as every job that samples builds it)."""
        from distillarena.defenses.policy import build_policy

        params = dict(policy.params)
        if defense_spec(policy.defense).needs_gradient:  # the gradient's method: the server's unless the key names one
            params.setdefault("method", self.antidistillation_method)
        key = (policy.defense, tuple(sorted(params.items())))
        built = self._policies.get(key)
        if built is None:
            built = build_policy(policy.defense, params, teacher=self.model, tokenizer=self.tokenizer,
                                 proxy=self.proxy, proxy_tokenizer=self.proxy_tokenizer or self.tokenizer,
                                 gradient=self.proxy_gradient)
            self._policies[key] = built
        return built

    def _processors(self, policy: PolicyConfig, temperature: float) -> tuple[list, float]:
        """The defense's processors for one batch, and the temperature the sampler should then use (the
        request's: it applies after the defense)."""
        from distillarena.decoding.processors import sampling_warpers

        if policy.defense == "none" and not policy.params:
            return [], temperature
        self.check_policy(policy)
        dp = self._decoding_policy(policy)
        for proc in dp.processors:
            if hasattr(proc, "reset"):
                proc.reset()
        own = [p for p in dp.processors if getattr(p, "applies_temperature", False)]
        if own:
            # a processor that divides by its own temperature (antidistillation): the defense's times the request's,
            # and the sampler's stays at 1 (0: greedy); such a policy's own temperature is 1, with no top-k / top-p
            own_temperature = float(policy.params.get("temperature", 1.0)) * (temperature if temperature > 0 else 1.0)
            for proc in own:
                proc.temperature = own_temperature
            temperature = 0.0 if temperature == 0 else 1.0
        return list(dp.processors) + sampling_warpers(dp.temperature, dp.top_k, dp.top_p), temperature

    @torch.no_grad()
    def _sample(self, batch: list[GenJob]) -> list[GenResult]:
        first = batch[0]
        rows = [p for job in batch for p in job.prompts for _ in range(job.n)]
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        processors, temperature = self._processors(first.policy, first.temperature)
        want = [j.logprobs for j in batch if j.logprobs is not None]
        greedy = temperature == 0.0
        k_max = max(want) if want else 0
        reveal = max(k_max, 1) if want and (greedy or k_max > 0) else None
        generator = None
        if first.seed is not None:
            generator = torch.Generator().manual_seed(first.seed % 2**63)
        res = sample(
            self.model, ids, mask, max_new_tokens=max(j.max_tokens for j in batch), temperature=temperature,
            top_p=first.top_p, processors=processors, pad_token_id=self.pad_token_id, stop_strings=first.stop,
            tokenizer=self.tokenizer if first.stop else None, generator=generator, reveal=reveal,
        )
        self.batches += 1
        self.rows_sampled += len(rows)
        tokens, lengths, finished = res.tokens.tolist(), res.lengths.tolist(), res.finished.tolist()
        chosen_lp = res.top_logprobs[..., 0] if (greedy and reveal) else res.logprobs
        eos = set(res.eos_token_ids)
        out: list[GenResult] = []
        row = 0
        for job in batch:
            seqs = []
            noise_gen = None
            if job.logprobs is not None and job.policy.noise_std > 0:
                noise_gen = torch.Generator()
                noise_gen.manual_seed(_noise_seed(job.seed))
            for _ in range(job.rows):
                cut = min(int(lengths[row]), job.max_tokens)
                toks = tokens[row][:cut]
                stopped = bool(finished[row]) and int(lengths[row]) <= job.max_tokens
                body = toks[:-1] if (stopped and toks and toks[-1] in eos) else toks
                full, offsets = self.tokens.decode(body)
                text = cut_at_stop_strings(full, job.stop)
                if len(text) < len(full):
                    stopped = True
                shown = sum(1 for o in offsets if o < len(text))
                seq = GenSequence(token_ids=toks, text=text, finish_reason="stop" if stopped else "length",
                                  shown=shown, offsets=offsets[:shown])
                if job.logprobs is not None:
                    m = len(toks) if job.all_tokens else shown
                    lp = chosen_lp[row, :m].clone()
                    top_ids = top_vals = None
                    if job.logprobs > 0:
                        top_ids = res.top_ids[row, :m, : job.logprobs]
                        top_vals = res.top_logprobs[row, :m, : job.logprobs].clone()
                    lp, top_vals = _apply_reveal(job.policy, torch.tensor(toks[:m], dtype=torch.long), lp,
                                                 top_ids, top_vals, noise_gen)
                    d = job.policy.decimals
                    seq.logprobs = [_finite(v, d) for v in lp.tolist()]
                    if top_ids is not None:
                        seq.top = [[(int(i), _finite(v, d)) for i, v in zip(ti, tv, strict=True)]
                                   for ti, tv in zip(top_ids.tolist(), top_vals.tolist(), strict=True)]
                    else:
                        seq.top = [[] for _ in range(m)]
                seqs.append(seq)
                row += 1
            out.append(GenResult(sequences=seqs, prompt_tokens=sum(len(p) for p in job.prompts),
                                 completion_tokens=sum(len(s.token_ids) for s in seqs), batch_rows=len(rows)))
        return out


def _noise_seed(seed: int | None) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return int.from_bytes(hashlib.sha256(f"reveal-noise:{seed}".encode()).digest()[:8], "little") >> 1


def _finite(v: float, decimals: int | None = None) -> float:
    """A revealed value as JSON can carry it: -inf (and anything below) as -9999.0, at most 0 (noise can push a
    log-prob above 0), rounded in decimal when the policy rounds."""
    v = min(0.0, max(NEG_INF_LOGPROB, float(v))) if v == v else NEG_INF_LOGPROB
    return round(v, decimals) if decimals is not None else v


def _apply_reveal(policy: PolicyConfig, chosen: torch.Tensor, lp: torch.Tensor, top_ids: torch.Tensor | None,
                  top_vals: torch.Tensor | None, gen: torch.Generator | None):
    """The key's policy on revealed values: Gaussian noise (the chosen token gets the same noisy value as in its
    top-k entry when it has one), then rounding."""
    if policy.noise_std > 0 and gen is not None:
        lp = lp + torch.randn(lp.shape, generator=gen) * policy.noise_std
        if top_vals is not None and top_vals.numel():
            top_vals = top_vals + torch.randn(top_vals.shape, generator=gen) * policy.noise_std
            match = top_ids == chosen[:, None]
            hit = match.any(-1)
            first = match.float().argmax(-1)
            lp = torch.where(hit, top_vals.gather(-1, first[:, None]).squeeze(-1), lp)
    if policy.decimals is not None:
        lp = torch.round(lp, decimals=policy.decimals)
        if top_vals is not None:
            top_vals = torch.round(top_vals, decimals=policy.decimals)
    return lp, top_vals


__all__ = ["NEG_INF_LOGPROB", "Engine", "EngineClosed", "GenJob", "GenResult", "GenSequence", "ServerMisconfigured",
           "TokenTable"]
