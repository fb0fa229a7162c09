"""The answer to a generation request in OpenAI's shapes: one JSON body, or server-sent events (``stream: true``)
ending with ``data: [DONE]``, with the revealed log-probs written per endpoint (chat: ``content`` entries with
``top_logprobs``; completions: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``).

With ``return_tokens_as_token_ids`` tokens and alternatives are named ``token_id:<id>`` instead of their text. A
stream sends one event per token as the backend hands it over (:class:`~distillarena.serve.backend.StreamDelta`),
the choices of a request interleaved as they are sampled. ``echo`` puts the prompt (and, with ``logprobs``, its
scored tokens, the first with a null log-prob) before each completion; ``prompt_logprobs`` is vLLM's list (null for
the first token, then ``{token id: {logprob, rank, decoded_token}}`` of the prompt's token and its alternatives;
``rank`` is the position among the revealed alternatives, null outside them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from distillarena import __version__
from distillarena.serve.backend import Backend, GenResult, GenSequence, ScoredPrompt, StreamDelta
from distillarena.serve.errors import ApiError
from distillarena.serve.routes.plan import Plan
from distillarena.serve.state import AppState, RequestContext

END = "end"  # the queue's last item: (END, GenResult)


def _base(state: AppState, ctx: RequestContext, plan: Plan) -> dict:
    return {"id": ("chatcmpl-" if plan.chat else "cmpl-") + ctx.request_id, "created": int(ctx.arrived),
            "model": state.model_name, "system_fingerprint": f"fp_distillarena_{__version__}"}


def _usage(result: GenResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def respond(state: AppState, ctx: RequestContext, plan: Plan, result: GenResult) -> JSONResponse:
    base = _base(state, ctx, plan)
    lp = _LogprobWriter(plan, state.backend)
    n = plan.job.n
    if plan.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text, "refusal": None},
                    "logprobs": None if plan.logprobs is None else
                    {"content": lp.chat(*_revealed(s)), "refusal": None},
                    "finish_reason": s.finish_reason} for i, s in enumerate(result.sequences)]
        body = {**base, "object": "chat.completion", "choices": choices, "usage": _usage(result)}
        if plan.prompt_logprobs is not None and result.scored:
            body["prompt_logprobs"] = lp.prompt_logprobs(result.scored[0], plan.prompt_logprobs)
    else:
        choices = []
        for p in range(len(plan.job.prompts)):
            scored = result.scored[p] if result.scored else None
            for j in range(n):
                i = p * n + j
                s = result.sequences[i] if result.sequences else None
                echo = None
                if plan.echo:
                    echo = scored.text if scored is not None else (plan.prompt_texts or [""] * (p + 1))[p]
                choices.append(_completion_choice(i, s, scored, plan, lp, echo))
        body = {**base, "object": "text_completion", "choices": choices, "usage": _usage(result)}
    return JSONResponse(body, headers={"x-request-id": ctx.request_id})


def _completion_choice(i: int, s: GenSequence | None, scored: ScoredPrompt | None, plan: Plan,
                       lp: _LogprobWriter, echo: str | None) -> dict:
    text = s.text if s is not None else ""
    finish = s.finish_reason if s is not None else "length"
    logprobs = None
    if plan.logprobs is not None:
        ids, vals, tops, offsets = _revealed(s) + (_offsets(s),) if s is not None else ([], [], [], [])
        if plan.echo and scored is not None:
            shift = len(scored.text)
            ids = scored.token_ids + ids
            vals = scored.logprobs + vals
            tops = [None if t is None else t[: plan.logprobs] for t in scored.top] + tops
            offsets = scored.offsets + [shift + o for o in offsets]
        logprobs = lp.completion(ids, vals, tops, offsets)
    if echo is not None:
        text = echo + text
    choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if plan.prompt_logprobs is not None and scored is not None:
        choice["prompt_logprobs"] = lp.prompt_logprobs(scored, plan.prompt_logprobs)
    return choice


def _revealed(s: GenSequence) -> tuple[list[int], list, list]:
    """The tokens with revealed log-probs (those shown, or every generated one with token ids) and their values."""
    m = len(s.logprobs) if s.logprobs is not None else s.shown
    return s.token_ids[:m], list(s.logprobs or [])[:m], list(s.top or [])[:m]


def _offsets(s: GenSequence) -> list[int]:
    m = len(s.logprobs) if s.logprobs is not None else s.shown
    return [s.offsets[t] if t < s.shown else len(s.text) for t in range(m)]


def stream_response(state: AppState, ctx: RequestContext, plan: Plan, queue: asyncio.Queue) -> StreamingResponse:
    return StreamingResponse(_events(state, ctx, plan, queue), media_type="text/event-stream",
                             headers={"x-request-id": ctx.request_id, "cache-control": "no-cache"})


async def _events(state: AppState, ctx: RequestContext, plan: Plan, queue: asyncio.Queue) -> AsyncIterator[str]:
    base = _base(state, ctx, plan)
    lp = _LogprobWriter(plan, state.backend)
    obj = "chat.completion.chunk" if plan.chat else "text_completion"
    extra = {"usage": None} if plan.include_usage else {}

    def event(choices: list, **more) -> str:
        return "data: " + json.dumps({**base, "object": obj, "choices": choices, **extra, **more},
                                     ensure_ascii=False, allow_nan=False) + "\n\n"

    if plan.chat:
        for i in range(len(plan.job.prompts) * plan.job.n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    written: dict[int, int] = {}  # characters sent per choice (the next token's text offset)
    while True:
        item = await queue.get()
        if isinstance(item, ApiError):
            yield "data: " + json.dumps({"error": {"message": item.message, "type": item.type, "param": item.param,
                                                   "code": item.code}}) + "\n\n"
            break
        if isinstance(item, tuple) and item[0] == END:
            if plan.include_usage:
                yield "data: " + json.dumps({**base, "object": obj, "choices": [], "usage": _usage(item[1])}) + "\n\n"
            break
        for d in item:
            for e in _delta_events(d, plan, lp, written):
                yield event([e])
    yield "data: [DONE]\n\n"


def _delta_events(d: StreamDelta, plan: Plan, lp: _LogprobWriter, written: dict[int, int]) -> list[dict]:
    out = []
    i = d.index
    for t, (tid, piece) in enumerate(zip(d.token_ids, d.pieces, strict=True)):
        offset = written.get(i, 0)
        written[i] = offset + len(piece)
        revealed = plan.logprobs is not None and d.logprobs is not None
        if plan.chat:
            chunk_lp = {"content": lp.chat([tid], d.logprobs[t:t + 1], d.top[t:t + 1]), "refusal": None} \
                if revealed else None
            out.append({"index": i, "delta": {"content": piece}, "logprobs": chunk_lp, "finish_reason": None})
        else:
            chunk_lp = lp.completion([tid], d.logprobs[t:t + 1], d.top[t:t + 1], [offset]) if revealed else None
            out.append({"index": i, "text": piece, "logprobs": chunk_lp, "finish_reason": None})
    if d.finish_reason is not None:
        if plan.chat:
            out.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason})
        else:
            out.append({"index": i, "text": "", "logprobs": None, "finish_reason": d.finish_reason})
    return out


class _LogprobWriter:
    """Revealed log-probs, as each endpoint writes them."""

    def __init__(self, plan: Plan, backend: Backend):
        self.token_ids = plan.token_ids
        self.backend = backend

    def name(self, tid: int) -> str:
        return f"token_id:{tid}" if self.token_ids else self.backend.tokens.strings[tid]

    def token(self, tid: int) -> tuple[str, list[int]]:
        return self.name(tid), list(self.backend.tokens.bytes[tid])

    def chat(self, ids: list[int], values: list[float], tops: list) -> list[dict]:
        out = []
        for tid, v, top in zip(ids, values, tops, strict=True):
            tok, raw = self.token(tid)
            alts = []
            for aid, av in top or []:
                atok, araw = self.token(aid)
                alts.append({"token": atok, "logprob": av, "bytes": araw})
            out.append({"token": tok, "logprob": v, "bytes": raw, "top_logprobs": alts})
        return out

    def completion(self, ids: list[int], values: list, tops: list, offsets: list[int]) -> dict:
        top = []
        for row in tops:
            if row is None:
                top.append(None)
                continue
            alts: dict[str, float] = {}
            for tid, v in row:  # best first; two ids with the same text keep the better one
                alts.setdefault(self.name(tid), v)
            top.append(alts)
        return {"tokens": [self.name(t) for t in ids], "token_logprobs": list(values), "top_logprobs": top,
                "text_offset": list(offsets)}

    def prompt_logprobs(self, scored: ScoredPrompt, k: int) -> list:
        out: list = []
        for tid, v, top in zip(scored.token_ids, scored.logprobs, scored.top, strict=True):
            if v is None:
                out.append(None)
                continue
            entries: dict[str, dict] = {}
            alts = (top or [])[:k]
            rank = next((r for r, (aid, _) in enumerate(alts, 1) if aid == tid), None)
            entries[str(tid)] = {"logprob": v, "rank": rank, "decoded_token": self.name(tid)}
            for r, (aid, av) in enumerate(alts, 1):
                entries.setdefault(str(aid), {"logprob": av, "rank": r, "decoded_token": self.name(aid)})
            out.append(entries)
        return out


__all__ = ["END", "respond", "stream_response"]
