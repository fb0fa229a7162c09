"""Request and response bodies, mirroring OpenAI's (chat completions, legacy completions, models, errors).

Requests are validated strictly (``"1"`` is not an integer, ``1`` is not a boolean, NaN is not a temperature), and
unknown fields are tolerated, as OpenAI's API does. Fields OpenAI defines that this server cannot honour
(``logit_bias``, penalties, tools, ``best_of``, ``suffix``, non-text response formats, ``echo`` on chat) are
accepted only at their neutral value; anything else is a 400 that names the field, never a silent no-op.
``echo`` (``/v1/completions``, with ``max_tokens`` 0 to only score the prompt) and vLLM's ``prompt_logprobs``
(both endpoints) return the key's policy's log-probs of the prompt's own tokens. The response models document the
API (OpenAPI) and are not used to validate what the server sends.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

INT64 = 2**63


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode (a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
Prob = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Request):
    model: Text = Field(description="the served model's id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, lt=INT64)
    temperature: Prob | None = Field(None, ge=0, le=2)
    top_p: Prob | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, lt=INT64)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    presence_penalty: Prob | None = Field(None, ge=-2, le=2)
    frequency_penalty: Prob | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Prob] | None = None
    return_tokens_as_token_ids: bool | None = Field(None, description=(
        "vLLM's extension: write revealed tokens as 'token_id:<id>', and reveal every generated token (the EOS "
        "too)"))
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description=(
        "vLLM's extension: the log-prob of each prompt token (after the first) and this many alternatives, under "
        "the key's policy; the prompt's tokens are billed"))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for a field set to something this server cannot do, else None."""
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported (only 0)"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    echo: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is supported on /v1/completions only"
        if self.tools:
            return "tools", "tools are not supported"
        if self.functions:
            return "functions", "functions are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only the text response format is supported"
        return super().unsupported()


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids or a list of lists of token ids")
    max_tokens: int | None = Field(None, ge=0, lt=INT64, description="0 only with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = Field(None, description="the prompt before the completion (with logprobs: the key's "
                              "policy's log-prob of each prompt token, billed)")
    best_of: int | None = Field(None, ge=1, lt=INT64)
    suffix: Text | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of", "best_of is not supported (only equal to n)"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()


# -- responses (documentation) --------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token of an echo (no context)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None  # position among the revealed alternatives (None: not among them)
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queue: int  # requests waiting for the engine
    batches: int  # sampler calls so far
    rows: int  # sequences sampled so far (rows / batches: the mean batch size)


__all__ = ["ChatCompletion", "ChatCompletionRequest", "ChatMessage", "Completion", "CompletionRequest",
           "ErrorResponse", "Health", "ModelList", "StreamOptions"]
