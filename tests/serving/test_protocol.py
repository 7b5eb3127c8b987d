"""The wire format without a server: OpenAI's four prompt forms, one error naming the field for a value that fits
none of a field's types, lists that stop at their first bad item, and error messages that quote clients' strings
only short and escaped."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.protocol import MAX_SHOWN_CHARS, ApiError, ChatRequest, CompletionRequest, parse, shown


def request(**fields) -> bytes:
    return json.dumps({"model": "default", "prompt": "x", **fields}).encode()


@pytest.mark.parametrize("prompt, prompts", [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]),
                                             ([[1], [2, 3]], [[1], [2, 3]])])
def test_the_four_prompt_forms(prompt, prompts) -> None:
    assert parse(CompletionRequest, request(prompt=prompt)).prompts == prompts


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": [[1], "a"]}, "prompt", "invalid_type"),
    ({"prompt": [3, -1]}, "prompt.1", "invalid_value"),
    ({"prompt": [[1], []]}, "prompt.1", "invalid_value"),
    ({"stop": {"a": 1}}, "stop", "invalid_type"),
    ({"stop": ["a"] * 5}, "stop", "invalid_value"),
    ({"logit_bias": {"1": "x"}}, "logit_bias", "invalid_type"),
])
def test_a_value_fitting_none_of_the_types_gets_one_error_naming_the_field(fields, param, code) -> None:
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, request(**fields))
    assert (e.value.param, e.value.code) == (param, code) and e.value.message.startswith(param)


def test_chat_content_of_the_wrong_type_names_the_message() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]})
    with pytest.raises(ApiError) as e:
        parse(ChatRequest, body.encode())
    assert e.value.param == "messages.1.content" and "a string or a list of content parts" in e.value.message


def test_a_long_list_of_bad_items_is_one_error_per_type_tried() -> None:
    for fields in ({"prompt": ["x"] * 10_000 + [1]}, {"prompt": [1] * 10_000 + ["x"]}, {"stop": [1] * 10_000}):
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})
        assert e.value.error_count() <= 4, fields
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate({"model": "m", "messages": [{}] * 10_000})
    assert {err["loc"][:2] for err in e.value.errors()} == {("messages", 0)}  # the first message's errors only


def test_clients_strings_are_quoted_short_and_escaped() -> None:
    assert shown("a\ud800b") == "a\\ud800b"
    assert shown("x" * 1000) == "x" * MAX_SHOWN_CHARS + "..."
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, b'{"model": "m", "prompt": "x", "' + b"\\ud800" * 500 + b'": 1}')
    assert e.value.code == "invalid_value" and "\ud800" not in e.value.message
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, request(**{"y" * 5000: 1}))
    assert e.value.code == "unknown_parameter" and len(e.value.param) < 2 * MAX_SHOWN_CHARS
    json.dumps(e.value.body(), ensure_ascii=False).encode()  # as the response writes it
