"""The OpenAI wire format: request schemas (validated strictly, so a wrong type or an unknown field is named, never
coerced or ignored), OpenAI-style errors, and the bodies of responses and stream chunks.

Supported beyond OpenAI's fields, under vLLM's names: `top_k`, `repetition_penalty`, `ignore_eos`. OpenAI fields
the engine cannot honour (logprobs, penalties other than 0, logit_bias, suffix, echo, best_of > 1, tools) are
rejected with a message naming them rather than silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 500: "internal_error",
             503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(max(1, round(self.retry_after_s)))}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 = off
    repetition_penalty: float = Field(1.0, gt=0)  # vLLM's extension; 1 = off
    ignore_eos: bool = False  # vLLM's extension

    # field -> the values the engine honours; anything else is refused by name
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"presence_penalty": (0.0,), "frequency_penalty": (0.0,),
                                                         "logit_bias": (None, {})}

    def check(self) -> None:
        """What the schema cannot say: unsupported values, and stop sequences OpenAI's way (1 to 4, non-empty)."""
        for name, allowed in self.UNSUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise ApiError(400, f"{name}={getattr(self, name)!r} is not supported by this server (only "
                               f"{' or '.join(map(repr, allowed))})", name, "unsupported_parameter")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty stop sequences", "stop", "invalid_value")

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The engine's sampling fields (SamplingParams names; max_tokens None = as many as the limits allow)."""
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": max(self.top_k, 0), "repetition_penalty": self.repetition_penalty,
                "stop": [self.stop] if isinstance(self.stop, str) else list(self.stop or []), "seed": self.seed,
                "ignore_eos": self.ignore_eos}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.UNSUPPORTED, "echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None,)}

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.UNSUPPORTED, "logprobs": (False,), "top_logprobs": (None,)}


FIELDS = {name for m in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions)
          for name in m.model_fields}


def parse(schema: type[_Sampling], body: bytes) -> _Sampling:
    """A validated request, or an ApiError naming the offending field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()[0]) from None
    request.check()
    return request


def _validation_error(err: dict[str, Any]) -> ApiError:
    param = _param(err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return ApiError(400, f"{param}: a required field is missing", param, "missing_required_parameter")
    if kind == "extra_forbidden":  # the unknown name itself ends the location
        param = ".".join(map(str, err["loc"]))
        return ApiError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    code = "invalid_type" if kind.endswith("_type") or kind == "literal_error" else "invalid_value"
    return ApiError(400, f"{param}: {msg}", param, code)


def _param(loc: tuple[Any, ...]) -> str:
    """The dotted field path of a pydantic error location, without its union-member tags."""
    parts = []
    for part in loc:
        if not (isinstance(part, int) or part in FIELDS):
            break
        parts.append(str(part))
    return ".".join(parts)


# ---- responses --------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, results: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """A whole (chat) completion from the model replicas' results, one choice per result."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                    "finish_reason": r["finish_reason"], "logprobs": None} for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                   for i, r in enumerate(results)]
    prompt_tokens = sum(r["prompt_tokens"] for r in _first_of_each_prompt(results))
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(r["completion_tokens"] for r in results))}


def _first_of_each_prompt(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt tokens count once per prompt, not once per sample of it (as OpenAI counts them with n > 1)."""
    return [r for r in results if r.get("sample", 0) == 0]


def chunk(rid: str, model: str, index: int, text: str | None, finish_reason: str | None, chat: bool,
          role: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
