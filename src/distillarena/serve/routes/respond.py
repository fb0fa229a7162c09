"""The answer to a generation request in OpenAI's shapes: one JSON body, or server-sent events (``stream: true``)
ending with ``data: [DONE]``, with the revealed log-probs written per endpoint (chat: ``content`` entries with
``top_logprobs``; completions: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``).

With ``return_tokens_as_token_ids`` tokens and alternatives are named ``token_id:<id>`` instead of their text. The
backend generates the whole completion before anything is sent, so a stream's first token comes at the full
latency.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.responses import JSONResponse, StreamingResponse

from distillarena import __version__
from distillarena.serve.backend import Backend, GenResult, GenSequence
from distillarena.serve.routes.plan import Plan
from distillarena.serve.state import AppState, RequestContext


def respond(state: AppState, ctx: RequestContext, plan: Plan, result: GenResult):
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_tokens + result.completion_tokens}
    headers = {"x-request-id": ctx.request_id}
    base = {"id": ("chatcmpl-" if plan.chat else "cmpl-") + ctx.request_id, "created": int(ctx.arrived),
            "model": state.model_name, "system_fingerprint": f"fp_distillarena_{__version__}"}
    lp = _LogprobWriter(plan, state.backend)
    if not plan.stream:
        if plan.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": s.text, "refusal": None},
                        "logprobs": None if plan.logprobs is None else
                        {"content": lp.chat(s, 0, _revealed(s)), "refusal": None},
                        "finish_reason": s.finish_reason} for i, s in enumerate(result.sequences)]
            body = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
        else:
            choices = [{"index": i, "text": s.text,
                        "logprobs": None if plan.logprobs is None else lp.completion(s, 0, _revealed(s)),
                        "finish_reason": s.finish_reason} for i, s in enumerate(result.sequences)]
            body = {**base, "object": "text_completion", "choices": choices, "usage": usage}
        return JSONResponse(body, headers=headers)
    return StreamingResponse(_stream(base, plan, result, usage, lp), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})


def _stream(base: dict, plan: Plan, result: GenResult, usage: dict, lp: _LogprobWriter) -> Iterator[str]:
    obj = "chat.completion.chunk" if plan.chat else "text_completion"
    extra = {"usage": None} if plan.include_usage else {}

    def event(choices: list, **more) -> str:
        return "data: " + json.dumps({**base, "object": obj, "choices": choices, **extra, **more},
                                     ensure_ascii=False, allow_nan=False) + "\n\n"

    for i, s in enumerate(result.sequences):
        if plan.chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        for t in range(s.shown if plan.logprobs is None else _revealed(s)):
            end = s.offsets[t + 1] if t + 1 < s.shown else len(s.text)
            piece = s.text[s.offsets[t]:end] if t < s.shown else ""
            if plan.chat:
                chunk_lp = None if plan.logprobs is None else {"content": lp.chat(s, t, t + 1), "refusal": None}
                yield event([{"index": i, "delta": {"content": piece}, "logprobs": chunk_lp, "finish_reason": None}])
            else:
                chunk_lp = None if plan.logprobs is None else lp.completion(s, t, t + 1)
                yield event([{"index": i, "text": piece, "logprobs": chunk_lp, "finish_reason": None}])
        if plan.chat:
            yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": s.finish_reason}])
        else:
            yield event([{"index": i, "text": "", "logprobs": None, "finish_reason": s.finish_reason}])
    if plan.include_usage:
        yield "data: " + json.dumps({**base, "object": obj, "choices": [], "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"


def _revealed(s: GenSequence) -> int:
    """Tokens with revealed log-probs: those shown, or every generated one (token ids)."""
    return len(s.logprobs) if s.logprobs is not None else s.shown


class _LogprobWriter:
    """A sequence's revealed log-probs over tokens ``[start, stop)``, as each endpoint writes them."""

    def __init__(self, plan: Plan, backend: Backend):
        self.token_ids = plan.token_ids
        self.backend = backend

    def name(self, tid: int) -> str:
        return f"token_id:{tid}" if self.token_ids else self.backend.tokens.strings[tid]

    def token(self, tid: int) -> tuple[str, list[int]]:
        return self.name(tid), list(self.backend.tokens.bytes[tid])

    def chat(self, s: GenSequence, start: int, stop: int) -> list[dict]:
        out = []
        for t in range(start, stop):
            tok, raw = self.token(s.token_ids[t])
            alts = []
            for tid, v in (s.top[t] if s.top else []):
                atok, araw = self.token(tid)
                alts.append({"token": atok, "logprob": v, "bytes": araw})
            out.append({"token": tok, "logprob": s.logprobs[t], "bytes": raw, "top_logprobs": alts})
        return out

    def completion(self, s: GenSequence, start: int, stop: int) -> dict:
        tokens = [self.name(s.token_ids[t]) for t in range(start, stop)]
        top = None
        if s.top is not None:
            top = []
            for t in range(start, stop):
                alts: dict[str, float] = {}
                for tid, v in s.top[t]:  # best first; two ids with the same text keep the better one
                    alts.setdefault(self.name(tid), v)
                top.append(alts)
        offsets = [s.offsets[t] if t < s.shown else len(s.text) for t in range(start, stop)]
        return {"tokens": tokens, "token_logprobs": s.logprobs[start:stop], "top_logprobs": top,
                "text_offset": offsets}


__all__ = ["respond"]
