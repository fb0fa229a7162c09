"""A generation request checked against the server's limits and the key's policy, tokenized, and sized for its
reservation: :func:`plan_request` turns it into the backend's :class:`~distillarena.serve.backend.GenJob`, or
raises the first problem as a 400 :class:`~distillarena.serve.errors.ApiError`, in this order: unsupported
parameters, model, ``n``, ``stop``, log-probs against the key's policy, the prompts, the context length,
``max_tokens``."""

from __future__ import annotations

from dataclasses import dataclass

from distillarena.core.errors import UserError
from distillarena.serve.backend import GenJob
from distillarena.serve.config import PolicyConfig
from distillarena.serve.errors import MAX_BODY_BYTES, ApiError
from distillarena.serve.state import AppState, RequestContext
from distillarena.serve.store import KeyRecord

MAX_STOP = 4


@dataclass
class Plan:
    job: GenJob
    stream: bool
    include_usage: bool
    chat: bool
    logprobs: int | None
    token_ids: bool = False  # name tokens token_id:<id> (and reveal the EOS too)


def plan_request(state: AppState, body, key: KeyRecord, chat: bool, ctx: RequestContext) -> Plan:
    """Check a request against the server's limits and the key's policy; tokenize it; size its reservation."""
    policy = key.policy
    n, stop = _check_basics(state, body, ctx)
    logprobs = _logprobs(body, chat, policy)
    prompts = _chat_prompts(state, body) if chat else _completion_prompts(state, body.prompt)
    if len(prompts) > state.config.max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts in one request, the most is {state.config.max_prompts}.",
                       param="prompt", code="invalid_value")
    longest = max(len(p) for p in prompts)
    ctx.prompt_tokens, ctx.n = sum(len(p) for p in prompts), n
    max_tokens = _max_tokens(state, body, chat, longest)
    ctx.reserved = max_tokens * n * len(prompts)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    job = GenJob(prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                 top_p=None if body.top_p is None else float(body.top_p), stop=tuple(stop), seed=body.seed,
                 logprobs=logprobs, policy=policy, all_tokens=bool(body.return_tokens_as_token_ids))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(job=job, stream=bool(body.stream), include_usage=include_usage, chat=chat, logprobs=logprobs,
                token_ids=bool(body.return_tokens_as_token_ids))


def _check_basics(state: AppState, body, ctx: RequestContext) -> tuple[int, list[str]]:
    """Unsupported parameters, the model, ``n`` and ``stop``; returns ``n`` and the stop strings."""
    cfg, model_name = state.config, state.model_name
    bad = body.unsupported()
    if bad is not None:
        raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
    if body.model != model_name:
        raise ApiError(400, f"The model '{ctx.model}' does not exist. This server serves '{model_name}'.",
                       param="model", code="model_not_found")
    n = body.n or 1
    if n > cfg.max_n:
        raise ApiError(400, f"n is {n}, the most this server allows is {cfg.max_n}.", param="n",
                       code="invalid_value")
    stop = body.stop_list()
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop must be at most {MAX_STOP} non-empty strings.", param="stop",
                       code="invalid_value")
    return n, stop


def _logprobs(body, chat: bool, policy: PolicyConfig) -> int | None:
    """What the client asks to see (None: no log-probs; k: the chosen token's and k alternatives), against what the
    key's policy reveals."""
    if chat:
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs",
                           code="invalid_value")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        lp_param = "top_logprobs" if body.top_logprobs else "logprobs"
    else:
        logprobs, lp_param = body.logprobs, "logprobs"
    if logprobs is not None:
        if not policy.logprobs:
            raise ApiError(400, "This API key is not allowed log-probs.", param="logprobs",
                           code="logprobs_not_allowed")
        if logprobs > policy.max_top_logprobs:
            raise ApiError(400, f"{lp_param} is {logprobs}, this API key reveals at most "
                           f"{policy.max_top_logprobs} alternatives per token.", param=lp_param,
                           code="logprobs_not_allowed")
    return logprobs


def _chat_prompts(state: AppState, body) -> list[list[int]]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return [state.backend.chat_prompt(messages)]
    except UserError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages is the client's problem
        raise ApiError(400, f"The messages cannot be rendered with the model's chat template: {e}",
                       param="messages", code="invalid_value") from None


def _completion_prompts(state: AppState, prompt) -> list[list[int]]:
    backend, max_prompts = state.backend, state.config.max_prompts
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise ApiError(400, "prompt is an empty list.", param="prompt", code="invalid_value")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > max_prompts:
        raise ApiError(400, f"{len(items)} prompts in one request, the most is {max_prompts}.",
                       param="prompt", code="invalid_value")
    out = []
    for item in items:
        if isinstance(item, str):
            if len(item) > MAX_BODY_BYTES:
                raise ApiError(400, "prompt too long", param="prompt", code="context_length_exceeded")
            ids = backend.encode(item)
        else:
            ids = list(item)
            if any(not 0 <= t < backend.vocab_size for t in ids):
                raise ApiError(400, f"prompt has token ids outside [0, {backend.vocab_size}).", param="prompt",
                               code="invalid_value")
        out.append(ids or [backend.start_token_id])
    return out


def _max_tokens(state: AppState, body, chat: bool, longest: int) -> int:
    """The completion's length cap, checked against the server's cap and the context left after the prompt."""
    cfg, ctx_len = state.config, state.backend.context_length
    if longest >= ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                       f"{longest}.", param="messages" if chat else "prompt", code="context_length_exceeded")
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if asked is None:
        max_tokens = min(cfg.max_tokens_cap, ctx_len - longest if chat else cfg.default_max_tokens)
    else:
        max_tokens = asked
    if max_tokens > cfg.max_tokens_cap:
        raise ApiError(400, f"max_tokens is {max_tokens}, the most this server allows is {cfg.max_tokens_cap}.",
                       param="max_tokens", code="invalid_value")
    if longest + max_tokens > ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                       f"{longest} and max_tokens asks for {max_tokens}. Reduce the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


__all__ = ["MAX_STOP", "Plan", "plan_request"]
