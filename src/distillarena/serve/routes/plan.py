"""A generation request checked against the server's limits and the key's policy, tokenized, and sized for its
reservation: :func:`plan_request` turns it into the backend's :class:`~distillarena.serve.backend.GenJob`, or
raises the first problem as a 400 :class:`~distillarena.serve.errors.ApiError`, in this order: unsupported
parameters, model, ``n``, ``stop``, sampling settings against the key's policy, log-probs against the key's policy,
the prompts (their size in bytes before they are tokenized, then in tokens), the context length, ``max_tokens``.

The reservation is the most the request can be billed: ``max_tokens x n`` per prompt, plus the prompt tokens when
the key counts them or the request scores them (echo with log-probs, ``prompt_logprobs``)."""

from __future__ import annotations

from dataclasses import dataclass

from distillarena.core.errors import UserError
from distillarena.serve.backend import GenJob
from distillarena.serve.config import PolicyConfig
from distillarena.serve.errors import ApiError
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
    echo: bool = False  # the prompt before each completion (completions)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs
    bills_prompt: bool = False  # the prompt tokens are billed (the key counts them, or the request scores them)
    prompt_texts: list[str] | None = None  # what echo puts before each completion (completions)


def plan_request(state: AppState, body, key: KeyRecord, chat: bool, ctx: RequestContext) -> Plan:
    """Check a request against the server's limits and the key's policy; tokenize it; size its reservation."""
    policy = key.policy
    n, stop = _check_basics(state, body, ctx)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = None if body.top_p is None else float(body.top_p)
    problem = policy.sampling_problem(temperature, top_p)
    if problem is not None:
        raise ApiError(400, problem[1], param=problem[0], code="unsupported_value")
    logprobs = _logprobs(body, chat, policy)
    echo = bool(getattr(body, "echo", None)) and not chat
    score = _score(body, policy, echo, logprobs)
    if body.stream and policy.rewrites_text:
        raise ApiError(400, f"This API key's defense ({policy.label()}) rewrites each whole completion after "
                       "sampling: stream is not supported with it.", param="stream", code="unsupported_parameter")
    if body.stream and (echo or body.prompt_logprobs is not None):
        param = "echo" if echo else "prompt_logprobs"
        raise ApiError(400, f"{param} is not supported with stream: true.", param=param, code="unsupported_parameter")
    prompts = _chat_prompts(state, body) if chat else _completion_prompts(state, body.prompt)
    if len(prompts) > state.config.max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts in one request, the most is {state.config.max_prompts}.",
                       param="prompt", code="invalid_value")
    longest = max(len(p) for p in prompts)
    ctx.prompt_tokens, ctx.n = sum(len(p) for p in prompts), n
    max_tokens = _max_tokens(state, body, chat, longest, echo)
    bills_prompt = key.count_prompt or score is not None
    ctx.reserved = max_tokens * n * len(prompts) + (ctx.prompt_tokens if bills_prompt else 0)
    job = GenJob(prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                 seed=body.seed, logprobs=logprobs, policy=policy, all_tokens=bool(body.return_tokens_as_token_ids),
                 score=score, noise_key=state.noise_key(policy) if policy.noise_std > 0 else None)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    texts = None
    if echo:  # the prompts as given (token ids: their bytes, decoded)
        raw = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
            else [body.prompt]
        texts = [x if isinstance(x, str) else b"".join(state.backend.tokens.bytes[t] for t in x).decode(
            "utf-8", "replace") for x in raw]
    return Plan(job=job, stream=bool(body.stream), include_usage=include_usage, chat=chat, logprobs=logprobs,
                token_ids=bool(body.return_tokens_as_token_ids), echo=echo, prompt_logprobs=body.prompt_logprobs,
                bills_prompt=bills_prompt, prompt_texts=texts)


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


def _allowed(policy: PolicyConfig, k: int, param: str) -> None:
    if policy.rewrites_text:
        raise ApiError(400, f"This API key's defense ({policy.label()}) rewrites the teacher's text: it reveals no "
                       "log-probs.", param=param, code="logprobs_not_allowed")
    if not policy.logprobs:
        raise ApiError(400, "This API key is not allowed log-probs.", param=param, code="logprobs_not_allowed")
    if k > policy.max_top_logprobs:
        raise ApiError(400, f"{param} is {k}, this API key reveals at most {policy.max_top_logprobs} alternatives "
                       "per token.", param=param, code="logprobs_not_allowed")


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
        _allowed(policy, logprobs, lp_param)
    return logprobs


def _score(body, policy: PolicyConfig, echo: bool, logprobs: int | None) -> int | None:
    """How many alternatives to reveal for each prompt token (None: the prompt is not scored)."""
    wanted = []
    if echo and logprobs is not None:
        wanted.append(logprobs)
    if body.prompt_logprobs is not None:
        _allowed(policy, body.prompt_logprobs, "prompt_logprobs")
        wanted.append(body.prompt_logprobs)
    return max(wanted) if wanted else None


def _too_long(state: AppState, size: int, param: str) -> ApiError:
    ctx_len = state.backend.context_length
    return ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the {param} has more ({size} "
                    f"bytes, and no token is longer than {state.max_prompt_bytes // ctx_len} bytes).", param=param,
                    code="context_length_exceeded")


def _bounded(state: AppState, text: str, param: str, size: int = 0) -> int:
    """``size`` plus the UTF-8 size of ``text``; a 400 as soon as the total is over what the context can hold
    (checked on the characters first: a string has at least as many bytes as characters)."""
    bound = state.max_prompt_bytes
    if size + len(text) > bound:
        raise _too_long(state, size + len(text), param)
    size += len(text.encode("utf-8"))
    if size > bound:
        raise _too_long(state, size, param)
    return size


def _chat_prompts(state: AppState, body) -> list[list[int]]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    size = 0
    for m in body.messages:
        size = _bounded(state, m.text() + (m.name or ""), "messages", size)
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
    for item in items:  # every size first, so that no prompt is tokenized when one is too long
        if isinstance(item, str):
            _bounded(state, item, "prompt")
        elif len(item) >= backend.context_length:
            raise ApiError(400, f"This model's maximum context length is {backend.context_length} tokens; the "
                           f"prompt has {len(item)}.", param="prompt", code="context_length_exceeded")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = backend.encode(item)
        else:
            ids = list(item)
            if any(not 0 <= t < backend.vocab_size for t in ids):
                raise ApiError(400, f"prompt has token ids outside [0, {backend.vocab_size}).", param="prompt",
                               code="invalid_value")
        out.append(ids or [backend.start_token_id])
    return out


def _max_tokens(state: AppState, body, chat: bool, longest: int, echo: bool) -> int:
    """The completion's length cap, checked against the server's cap and the context left after the prompt."""
    cfg, ctx_len = state.config, state.backend.context_length
    if longest >= ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                       f"{longest}.", param="messages" if chat else "prompt", code="context_length_exceeded")
    param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if asked is None:
        max_tokens = min(cfg.max_tokens_cap, ctx_len - longest if chat else cfg.default_max_tokens)
    else:
        max_tokens = asked
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt).", param=param,
                       code="invalid_value")
    if max_tokens > cfg.max_tokens_cap:
        raise ApiError(400, f"{param} is {max_tokens}, the most this server allows is {cfg.max_tokens_cap}.",
                       param=param, code="invalid_value")
    if longest + max_tokens > ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens; the prompt has "
                       f"{longest} and {param} asks for {max_tokens}. Reduce the prompt or {param}.",
                       param=param, code="context_length_exceeded")
    return max_tokens


__all__ = ["MAX_STOP", "Plan", "plan_request"]
