"""The OpenAI wire format: request schemas (validated strictly, so a wrong type or an unknown field is named, never
coerced or ignored), OpenAI-style errors, and the bodies of responses and stream chunks.

Supported beyond OpenAI's fields, under vLLM's names: `top_k`, `repetition_penalty`, `ignore_eos`; and this server's
`rag` on chat completions (documents to answer the last user message from, or the name of one of the model's
document stores, by superposition prompting or naive RAG; the answer's choices carry `kept_documents`). Chat messages take OpenAI's content parts, text and `image_url`
(vision-language models; the ingress passes the URLs on, the model replica accepts base64 `data:` URLs only, since
nothing is downloaded). OpenAI fields
the engine cannot honour (logprobs, penalties other than 0, logit_bias, suffix, echo, best_of > 1, tools) are
rejected with a message naming them rather than silently dropped.

Hostile bodies are client errors, never server ones: JSON nested too deep, NaN/Infinity, integers too long to convert
(`invalid_json`), non-finite floats, integers beyond a field's range and strings that are not valid Unicode (lone
surrogates, which no tokenizer and no JSON encoder can take) are refused naming the field (`invalid_value`). Every
integer field is bounded (token ids, counts: 32 bits; `seed`: 64 bits, as vLLM), stop strings are bounded in number
and total length, and no message echoes more than a short, escaped piece of what the client sent.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from raytrain.data.vqa import IMAGE

INT32_MAX = 2 ** 31 - 1
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
MAX_INT_DIGITS = 32  # longer integer literals are out of range for every field, and Python would refuse > 4300
MAX_STOPS, MAX_STOP_CHARS = 4, 1024  # stop strings per request (OpenAI's 4) and their total length
MAX_SHOWN_CHARS = 64  # of a client's string quoted back in an error message


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    TYPES = {500: "internal_error", 503: "service_unavailable", 504: "timeout"}  # else invalid_request_error

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return headers


def shown(text: str) -> str:
    """A client's string as an error message may quote it: short, and escaped where it is not valid Unicode."""
    cut = text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


# Lists stop at their first bad item (`fail_fast`): a body-sized list of wrong items costs one error, not one each.
Text = Annotated[str, AfterValidator(_valid_unicode)]
Texts = Annotated[list[Text], Field(min_length=1, fail_fast=True)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1, fail_fast=True)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
# OpenAI's four forms: a text, texts, token ids, lists of token ids (the model's replica checks ids against its
# vocabulary)
Prompt = Text | Texts | TokenIds | Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: Text
    max_tokens: Count | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Count = 1
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOPS, fail_fast=True)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: Text | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(0, ge=-1, le=INT32_MAX)  # vLLM's extension; 0 and -1 = off
    repetition_penalty: float = Field(1.0, gt=0)  # vLLM's extension; 1 = off
    ignore_eos: bool = False  # vLLM's extension

    # field -> the values the engine honours; anything else is refused by name
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"presence_penalty": (0.0,), "frequency_penalty": (0.0,),
                                                         "logit_bias": (None, {})}

    def check(self) -> None:
        """What the schema cannot say: unsupported values, stop sequences OpenAI's way (1 to 4, non-empty) and
        within a total length, and stream_options only for streams."""
        for name, allowed in self.UNSUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise ApiError(400, f"{name}: not supported by this server (only {' or '.join(map(repr, allowed))})",
                               name, "unsupported_parameter")
        if len(self.stops) > MAX_STOPS or any(not s for s in self.stops):
            raise ApiError(400, f"stop: up to {MAX_STOPS} non-empty stop sequences", "stop", "invalid_value")
        if sum(map(len, self.stops)) > MAX_STOP_CHARS:
            raise ApiError(400, f"stop: the stop sequences have {sum(map(len, self.stops))} characters in all; at "
                           f"most {MAX_STOP_CHARS}", "stop", "invalid_value")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options", "invalid_value")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """The engine's sampling fields (SamplingParams names; max_tokens None = as many as the limits allow)."""
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": max(self.top_k, 0), "repetition_penalty": self.repetition_penalty,
                "stop": self.stops, "seed": self.seed,
                "ignore_eos": self.ignore_eos}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    best_of: Count | None = None
    suffix: Text | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.UNSUPPORTED, "echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None,)}

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else self.prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImageUrl(_Strict):
    url: Text
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart | ImagePart], Field(fail_fast=True)]
    name: Text | None = None

    def plain(self) -> dict[str, str]:
        """Role and text; an image part becomes the image placeholder (`raytrain.data.vqa.IMAGE`) in its place."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": "".join(p.text if isinstance(p, TextPart) else IMAGE
                                                      for p in self.content)}

    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                         if isinstance(p, ImagePart)]


class Rag(_Strict):
    """Retrieval-augmented generation: answer the last user message from `documents`, or from the documents of the
    model's document store named `store`."""

    documents: Texts | None = None
    store: Text | None = None
    mode: Literal["superposition", "naive"] | None = None  # None: as the model is configured
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)  # superposition: paths kept, 0 = all; None: the model's

    def check(self) -> None:
        if (self.documents is None) == (self.store is None):
            raise ApiError(400, "rag: give documents, or the name of one of the model's document stores as store, "
                           "not both", "rag", "invalid_value")
        empty = next((i for i, d in enumerate(self.documents or []) if not d.strip()), None)
        if empty is not None:
            raise ApiError(400, f"rag.documents.{empty}: the document is empty", f"rag.documents.{empty}",
                           "invalid_value")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT32_MAX)
    rag: Rag | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.UNSUPPORTED, "logprobs": (False,), "top_logprobs": (None,)}

    def check(self) -> None:
        super().check()
        if self.rag is None:
            return
        self.rag.check()
        if self.messages[-1].role != "user":
            raise ApiError(400, "messages: with rag, the last message is the question and must have role 'user'",
                           "messages", "invalid_value")


FIELDS = {name for m in (CompletionRequest, ChatRequest, ChatMessage, TextPart, ImagePart, ImageUrl, StreamOptions,
                          Rag)
          for name in m.model_fields}


class _LongInt:
    """An integer literal too long to be any field's value: validation refuses it, and the error names the field."""

    def __init__(self, literal: str) -> None:
        self.digits = len(literal.lstrip("-"))


def _int(literal: str) -> int | _LongInt:
    return int(literal) if len(literal) <= MAX_INT_DIGITS else _LongInt(literal)


def _constant(name: str) -> None:
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def parse(schema: type[_Sampling], body: bytes) -> _Sampling:
    """A validated request, or an ApiError naming the offending field."""
    try:
        data = json.loads(body, parse_int=_int, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON: it is not UTF-8 text", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None
    request.check()
    return request


# what a value of each field that takes several types may be (a wrong type is named with these, not per member)
UNION_TYPES = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
               "stop": "a string or a list of strings",
               "content": "a string or a list of content parts (text, image_url)"}


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """One ApiError for pydantic's errors: of a field that takes several types, the error of the type that matched
    furthest (a value error beats a type error at the same depth)."""
    err = max(errors, key=lambda e: (len(e["loc"]), not _type_error(e)))
    loc, kind, msg = err["loc"], err["type"], err["msg"]
    if kind == "extra_forbidden":  # the unknown name itself ends the location
        param = ".".join(filter(None, [_param(loc[:-1]), shown(str(loc[-1]))]))
        return ApiError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    param = _param(loc)
    if not param:  # the body itself, e.g. a field name that is not valid Unicode
        return ApiError(400, f"the request body: {msg}", code="invalid_value")
    if kind == "missing":
        return ApiError(400, f"{param}: a required field is missing", param, "missing_required_parameter")
    if isinstance(err.get("input"), _LongInt):
        return ApiError(400, f"{param}: an integer of {err['input'].digits} digits is out of range", param,
                        "invalid_value")
    if not _type_error(err):
        return ApiError(400, f"{param}: {msg.removeprefix('Value error, ')}", param, "invalid_value")
    union = _param(loc[:next((i for i, part in enumerate(loc) if _tag(part)), len(loc))])
    if union.rpartition(".")[2] in UNION_TYPES:
        return ApiError(400, f"{union}: expected {UNION_TYPES[union.rpartition('.')[2]]}", union, "invalid_type")
    return ApiError(400, f"{param}: {msg}", param, "invalid_type")


def _type_error(err: dict[str, Any]) -> bool:
    """A value of the wrong type (an integer too long to read is a value out of range, whatever type was wanted)."""
    kind = err["type"]
    return (kind.endswith("_type") or kind == "literal_error") and not isinstance(err.get("input"), _LongInt)


def _tag(part: Any) -> bool:
    """A pydantic location part that names a union member (or a dict key), not a field or a list index."""
    return not (isinstance(part, int) or part in FIELDS)


def _param(loc: tuple[Any, ...]) -> str:
    """The dotted field path of a pydantic error location, without its union-member tags."""
    return ".".join(str(part) for part in loc if not _tag(part))


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
                    "finish_reason": r["finish_reason"], "logprobs": None,
                    **({"kept_documents": r["kept_documents"]} if "kept_documents" in r else {})}
                   for i, r in enumerate(results)]
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
