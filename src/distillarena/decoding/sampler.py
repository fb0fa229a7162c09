"""KV-cached batched sampling over a Hugging Face causal LM, with the log-probs a distillation game needs.

Order of operations at every step (the same as ``model.generate``):

1. ``z`` = the model's next-token logits (float32);
2. the *undefended* distribution is ``log_softmax(z)``: temperature 1, no processor at all;
3. ``scores`` = the user's ``processors`` applied in order to ``z`` (defenses such as Product-of-Experts or
   antidistillation sampling go here);
4. then temperature, top-k, top-p (Hugging Face's order, Hugging Face's semantics);
5. the distribution *actually sampled* is ``softmax(scores)`` after all of the above; a token is drawn from it with
   the seeded generator (inverse-CDF, one uniform per row and step), or taken as the argmax when
   ``temperature == 0`` (then the sampled distribution is the point mass on that token).

Per step the sampler records, for the chosen token ``y``: ``log p_sampled(y)``, ``log p_undefended(y)``, and the
full-vocabulary ``KL(p_sampled || p_undefended)`` at that context (finite: the undefended distribution has full
support). Averaged over the generated tokens this is the game's "mean per-token KL between the defended and the
undefended distribution, measured on the defended teacher's own samples" (:meth:`SampleResult.mean_kl`).

Sequences stop on an EOS id or when their generated text contains a stop string; a finished sequence keeps its
batch slot (it is fed pad tokens, exactly as in ``generate``) and the loop ends when every sequence has finished.

Three optional additions, none of which changes what a call without them returns: ``reveal_from="processed"``
reveals the distribution after ``processors`` and before the sampler's own temperature / top-k / top-p (a server
reveals its policy's distribution whatever the request's sampling settings); ``on_step`` is called with each step's
tokens as soon as they are sampled (streaming); ``force`` takes given tokens instead of sampling them (scoring a
given text with the same processors, step by step, as generation would see it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.decoding.decoders import make_decoder
from distillarena.decoding.processors import (
    Processor,
    apply_processors,
    begin_processors,
    check_temperature,
    sample_from_probs,
    sampling_warpers,
)

# reveal(logprobs [B, V]) -> (ids [B, k], values [B, k]), or None when nothing is revealed
RevealFn = Callable[[Tensor], "tuple[Tensor, Tensor] | None"]


@dataclass
class SampleStep:
    """One step of :func:`sample`, as ``on_step`` sees it (after the step's tokens are chosen and the rows that they
    ended are marked). Tensors are the sampler's own: read them, do not modify them."""

    t: int  # the step (0 = the first generated token)
    tokens: Tensor  # [B] long, the token taken at this step (pad for rows that had already finished)
    active: Tensor  # [B] bool, rows that generated a token at this step
    ended: Tensor  # [B] bool, active rows that this step's token ended (EOS or stop string)
    logprobs: Tensor  # [B] log-prob of each token under the distribution sampled (0 when greedy)
    teacher: Tensor  # [B, V] the undefended distribution's log-probs at this step
    sampled: Tensor | None  # [B, V] the sampled distribution's log-probs (None when greedy)
    revealed: Tensor | None = None  # [B, V] the distribution a reveal policy reads (when one is given)
    reveal_logprobs: Tensor | None = None  # [B] each token's log-prob under ``revealed``
    top_ids: Tensor | None = None  # [B, k] what the reveal policy revealed at this step
    top_logprobs: Tensor | None = None  # [B, k]


StepFn = Callable[[SampleStep], None]


@dataclass
class SampleResult:
    """What :func:`sample` returns. ``T`` is the number of steps run (``<= max_new_tokens``).

    Every per-step tensor is ``[B, T]``; positions at or after a sequence's ``length`` hold ``pad_token_id`` in
    ``tokens`` and 0 elsewhere (use :attr:`mask`).
    """

    tokens: Tensor  # [B, T] long, the generated tokens (pad after the end)
    lengths: Tensor  # [B] long, tokens generated, including the EOS / stop-completing token
    finished: Tensor  # [B] bool, stopped by EOS or a stop string (False: ran out of max_new_tokens)
    logprobs: Tensor  # [B, T] float32, log-prob of each chosen token under the distribution actually sampled
    teacher_logprobs: Tensor  # [B, T] float32, log-prob under the undefended model (temperature 1, no processor)
    kl: Tensor  # [B, T] float32, KL(sampled || undefended) over the full vocabulary at each step
    top_ids: Tensor | None = None  # [B, T, k] long, the revealed token ids, if a reveal policy was given
    top_logprobs: Tensor | None = None  # [B, T, k] float32, the revealed values
    reveal_logprobs: Tensor | None = None  # [B, T] float32, each chosen token's log-prob under the revealed
    #   distribution (reveal_from), when a reveal policy was given
    prompt_ids: Tensor | None = None  # [B, P] the (left-padded) prompts
    prompt_mask: Tensor | None = None  # [B, P]
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    steps: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        """[B, T] bool, True at generated positions (before each sequence's end)."""
        t = self.tokens.shape[1]
        return torch.arange(t, device=self.tokens.device)[None, :] < self.lengths[:, None]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def mean_kl(self) -> float:
        """Mean per-token KL(sampled || undefended) over all generated tokens of the batch."""
        n = self.num_tokens
        return float(self.kl.sum()) / n if n else 0.0

    def mean_logratio(self) -> float:
        """Monte-Carlo estimate of the same KL: mean of log p_sampled(y) - log p_undefended(y) over the tokens."""
        n = self.num_tokens
        return float((self.logprobs - self.teacher_logprobs).sum()) / n if n else 0.0

    def sequences(self) -> Tensor:
        """[B, P + T] prompts followed by the generated tokens (as ``generate`` returns them)."""
        if self.prompt_ids is None:
            raise ValueError("this result has no prompts")
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    def texts(self, tokenizer, *, keep_stop_string: bool = False, skip_special_tokens: bool = True) -> list[str]:
        """Decode each generated sequence: up to its length, EOS and pad removed, cut at the first stop string
        (the stop string itself is dropped unless ``keep_stop_string``)."""
        drop = set(self.eos_token_ids) | {self.pad_token_id}
        rows = [
            [t for t in row[: int(n)] if t not in drop]
            for row, n in zip(self.tokens.tolist(), self.lengths.tolist(), strict=True)
        ]
        out = tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
        return [cut_at_stop_strings(text, self.stop_strings, keep_stop_string) for text in out]


def cut_at_stop_strings(text: str, stop_strings: Sequence[str], keep: bool = False) -> str:
    best = None
    for s in stop_strings:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, len(s))
    if best is None:
        return text
    return text[: best[0] + (best[1] if keep else 0)]


# ---------------------------------------------------------------------------------------------------------------
_STOP_TABLES: dict = {}


def _stop_table(tokenizer, stop_strings: tuple[str, ...], vocab_size: int, device) -> Tensor:
    """[V] bool: True for tokens that could be the last token of a stop string (conservative)."""
    key = (id(tokenizer), stop_strings, vocab_size)
    hit = _STOP_TABLES.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1].to(device)
    last_chars = {s[-1] for s in stop_strings}
    n = min(vocab_size, len(tokenizer))
    pieces = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    table = torch.ones(vocab_size, dtype=torch.bool)
    for i, text in enumerate(pieces):
        table[i] = (not text) or ("\ufffd" in text) or any(c in text for c in last_chars)
    if len(_STOP_TABLES) > 8:
        _STOP_TABLES.clear()
    _STOP_TABLES[key] = (tokenizer, table)
    return table.to(device)


def _as_id_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, int):
        return (ids,)
    if isinstance(ids, Tensor):
        return tuple(int(i) for i in ids.view(-1).tolist())
    return tuple(int(i) for i in ids)


def _default_special_ids(model, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
    gc = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    if eos_token_id is None:
        for src in (gc, cfg):
            if src is not None and getattr(src, "eos_token_id", None) is not None:
                eos_token_id = src.eos_token_id
                break
    eos = _as_id_tuple(eos_token_id)
    if pad_token_id is None:
        for src in (gc, cfg):
            if src is not None and getattr(src, "pad_token_id", None) is not None:
                pad_token_id = _as_id_tuple(src.pad_token_id)[0]
                break
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


def _top_k_reveal(k: int) -> RevealFn:
    def reveal(logprobs: Tensor) -> tuple[Tensor, Tensor]:
        vals, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        return ids, vals

    return reveal


# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    processors: Sequence[Processor] = (),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    reveal: int | RevealFn | None = None,
    reveal_from: str = "sampled",
    fast: bool | None = None,
    on_step: StepFn | None = None,
    force: Tensor | None = None,
) -> SampleResult:
    """Sample continuations of left-padded prompts ``input_ids`` ``[B, P]`` with a KV cache.

    ``processors`` run first (Hugging Face ``LogitsProcessor`` signature), then ``temperature`` (0 = greedy),
    ``top_k``, ``top_p``; see the module docstring for the exact order and what each returned log-prob means.
    ``eos_token_id`` / ``pad_token_id`` default to the model's generation config. ``stop_strings`` need
    ``tokenizer``. ``reveal`` is ``None`` (nothing), an int ``k`` (top-k log-probs) or a callable
    ``logprobs [B, V] -> (ids [B, k], values [B, k]) | None`` (see ``distillarena.defenses.reveal``), applied to the
    sampled distribution (``reveal_from="sampled"``), the undefended one (``"teacher"``), or the distribution after
    ``processors`` and before the sampler's own temperature, top-k and top-p (``"processed"``; the same tensor as
    ``"sampled"`` when those three change nothing); with a reveal policy the result also holds each chosen token's
    log-prob under that distribution (``reveal_logprobs``). ``fast`` selects the decoder (``None``: Llama fast path
    when supported). The prompts' ``attention_mask`` defaults to all ones.

    ``on_step(step)`` is called after every step with its :class:`SampleStep`. ``force`` ``[B, max_new_tokens]``
    (long) takes ``force[b, t]`` instead of the sampled token when it is ``>= 0``; a negative value ends row ``b``
    before step ``t`` (nothing is taken). A forced token never ends its row (EOS and stop strings are not checked
    on forced steps), so a given text is scored to its end with the same processors as generation.
    """
    steps = sample_steps(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, processors=processors, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        stop_strings=stop_strings, tokenizer=tokenizer, generator=generator, reveal=reveal, reveal_from=reveal_from,
        fast=fast, on_step=on_step, force=force,
    )
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@torch.no_grad()
def sample_steps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    processors: Sequence[Processor] = (),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    reveal: int | RevealFn | None = None,
    reveal_from: str = "sampled",
    fast: bool | None = None,
    on_step: StepFn | None = None,
    force: Tensor | None = None,
) -> Generator[int, None, SampleResult]:
    """:func:`sample` one step at a time: a generator that yields the index of each step once it is done (after
    ``on_step``) and returns the :class:`SampleResult`. A caller can interleave several calls step by step (a server
    starting a new batch while another is still generating); each call computes exactly what :func:`sample` would.
    """
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    max_new_tokens = int(max_new_tokens)
    temperature = check_temperature(temperature)
    greedy = temperature == 0.0
    processors = list(processors)
    if any(getattr(p, "applies_temperature", False) for p in processors) and temperature not in (0.0, 1.0):
        raise UserError(
            "a processor already divides by its own temperature (e.g. antidistillation sampling): "
            f"leave the sampler's temperature at 1.0, got {temperature}"
        )
    warpers = sampling_warpers(1.0 if greedy else temperature, top_k, top_p)
    chain = processors + warpers
    stop_strings = tuple(stop_strings)
    if stop_strings and tokenizer is None:
        raise UserError("stop_strings need a tokenizer")
    if any(not s for s in stop_strings):
        raise UserError("stop_strings contains an empty string")
    if reveal_from not in ("sampled", "teacher", "processed"):
        raise UserError(f"reveal_from must be 'sampled', 'teacher' or 'processed', got {reveal_from!r}")
    if isinstance(reveal, bool) or (isinstance(reveal, int) and reveal < 1):
        raise UserError(f"reveal must be None, an integer k >= 1 or a callable, got {reveal!r}")
    reveal_fn = _top_k_reveal(reveal) if isinstance(reveal, int) else reveal
    eos, pad = _default_special_ids(model, eos_token_id, pad_token_id)

    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    b, p = input_ids.shape
    n = max_new_tokens
    if force is not None and (force.dim() != 2 or force.shape[0] != b or force.shape[1] < n):
        raise UserError(f"force must be [batch, >= max_new_tokens] = [{b}, >= {n}], got {tuple(force.shape)}")
    decoder = make_decoder(model, fast=fast)
    logits = decoder.prefill(input_ids, attention_mask, n)
    begin_processors(processors, input_ids, attention_mask, n)

    ids = torch.empty(b, p + n, dtype=input_ids.dtype, device=device)
    ids[:, :p] = input_ids
    tokens = ids[:, p:]
    lp_sampled = torch.zeros(b, n, device=device)
    lp_teacher = torch.zeros(b, n, device=device)
    kl = torch.zeros(b, n, device=device)
    top_ids = top_vals = None
    lp_revealed = torch.zeros(b, n, device=device) if reveal_fn is not None else None
    alive = torch.ones(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=device) if eos else None
    pad_t = torch.full((b,), pad, dtype=input_ids.dtype, device=device)
    stop_table = _stop_table(tokenizer, stop_strings, logits.shape[-1], device) if stop_strings else None
    window = max((len(s) for s in stop_strings), default=0) + 3

    steps = 0
    for t in range(n):
        if force is not None:
            stop_here = alive & (force[:, t] < 0)
            if bool(stop_here.any()):
                finished |= stop_here
                alive &= ~stop_here
                if not bool(alive.any()):
                    break
        steps = t + 1
        teacher_lp = torch.log_softmax(logits, dim=-1)
        if reveal_from == "processed":
            processed = apply_processors(processors, ids[:, : p + t], logits)
            scores = apply_processors(warpers, ids[:, : p + t], processed)
        else:
            scores = apply_processors(chain, ids[:, : p + t], logits)
        if greedy:
            tok = scores.argmax(dim=-1)
            if force is not None:
                tok = torch.where(force[:, t] >= 0, force[:, t], tok)
            dist_lp = None
            chosen_lp = torch.zeros(b, device=device)
            step_kl = -teacher_lp.gather(-1, tok[:, None]).squeeze(-1)
        else:
            dist_lp = torch.log_softmax(scores, dim=-1)
            probs = dist_lp.exp()
            tok = sample_from_probs(probs, generator)
            if force is not None:
                tok = torch.where(force[:, t] >= 0, force[:, t], tok)
            chosen_lp = dist_lp.gather(-1, tok[:, None]).squeeze(-1)
            step_kl = (probs * (dist_lp - teacher_lp)).nansum(-1)  # 0 * -inf = nan: excluded tokens add 0
        tok = torch.where(alive, tok, pad_t)
        tokens[:, t] = tok
        lp_sampled[:, t] = chosen_lp
        lp_teacher[:, t] = teacher_lp.gather(-1, tok[:, None]).squeeze(-1)
        kl[:, t] = step_kl
        src = shown = None
        if reveal_fn is not None:
            if reveal_from == "teacher":
                src = teacher_lp
            elif reveal_from == "processed":
                src = dist_lp if (dist_lp is not None and not warpers) else processed.log_softmax(-1)
            else:  # greedy: the processed scores' distribution (no temperature)
                src = dist_lp if dist_lp is not None else scores.log_softmax(-1)
            shown = reveal_fn(src)
            if shown is not None:
                if top_ids is None:
                    k = shown[0].shape[-1]
                    top_ids = torch.zeros(b, n, k, dtype=torch.long, device=device)
                    top_vals = torch.zeros(b, n, k, device=device)
                top_ids[:, t], top_vals[:, t] = shown[0], shown[1].float()
            lp_revealed[:, t] = src.gather(-1, tok[:, None]).squeeze(-1)

        lengths += alive.long()
        ended = alive & torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(alive)
        if stop_table is not None:
            ended |= _stop_string_hits(tokenizer, tokens, t, alive & ~ended & stop_table[tok], stop_strings, window)
        if force is not None:
            ended &= force[:, t] < 0  # a forced token never ends its row
        if on_step is not None:
            on_step(SampleStep(
                t=t, tokens=tok, active=alive.clone(), ended=ended, logprobs=chosen_lp, teacher=teacher_lp,
                sampled=dist_lp, revealed=src, reveal_logprobs=None if src is None else lp_revealed[:, t],
                top_ids=None if shown is None else top_ids[:, t],
                top_logprobs=None if shown is None else top_vals[:, t],
            ))
        finished |= ended
        alive &= ~ended
        yield t
        if t == n - 1 or not bool(alive.any()):
            break
        logits = decoder.step(tok)

    sl = slice(0, steps)
    keep = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    return SampleResult(
        tokens=tokens[:, sl].clone(),
        lengths=lengths,
        finished=finished,
        logprobs=torch.where(keep, lp_sampled[:, sl], 0.0),
        teacher_logprobs=torch.where(keep, lp_teacher[:, sl], 0.0),
        kl=torch.where(keep, kl[:, sl], 0.0),
        top_ids=None if top_ids is None else torch.where(keep[..., None], top_ids[:, sl], 0),
        top_logprobs=None if top_vals is None else torch.where(keep[..., None], top_vals[:, sl], 0.0),
        reveal_logprobs=None if lp_revealed is None else torch.where(keep, lp_revealed[:, sl], 0.0),
        prompt_ids=input_ids,
        prompt_mask=attention_mask,
        pad_token_id=pad,
        eos_token_ids=eos,
        stop_strings=stop_strings,
        steps=steps,
    )


def _stop_string_hits(tokenizer, tokens: Tensor, t: int, candidates: Tensor, stops: tuple[str, ...], window: int):
    """Rows among ``candidates`` whose generated text, decoded over the last ``window`` tokens, has a stop string."""
    hits = torch.zeros_like(candidates)
    rows = candidates.nonzero().view(-1).tolist()
    if not rows:
        return hits
    start = max(0, t + 1 - window)
    tails = tokens[rows, start : t + 1].tolist()
    texts = tokenizer.batch_decode(tails, skip_special_tokens=False)
    for r, text in zip(rows, texts, strict=True):
        if any(s in text for s in stops):
            hits[r] = True
    return hits


__all__ = ["RevealFn", "SampleResult", "SampleStep", "StepFn", "cut_at_stop_strings", "sample", "sample_steps"]
