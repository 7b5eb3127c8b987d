"""The API under hostile input (issue 16), over real HTTP against the local Serve instance of conftest.py (which
wants an API key and takes bodies of at most 300 kB): each hostile request is sent beside normal ones, which must be
answered right; every client error is a 4xx in OpenAI's error format naming the field, never a 500 or an exception's
text; a fuzz of generated malformed requests leaves the server healthy; /health follows the replicas; a killed
replica's model answers 503 at once while Serve replaces it, and the other model keeps serving."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray

from raytrain.infer.engine import Engine, Request
from raytrain.infer.sampling import SamplingParams
from tests.serving.conftest import API_KEY as KEY
from tests.serving.conftest import AUTH, MAX_BODY

pytestmark = pytest.mark.integration
NORMAL = [{"model": "default", "prompt": p, "max_tokens": 8, "temperature": 0}
          for p in ("The if statement", "A class definition")]


@pytest.fixture(scope="module")
def engine(checkpoint) -> Engine:
    return Engine.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def alongside(server, engine) -> Callable[..., list[httpx.Response]]:
    """Runs hostile calls concurrently with the NORMAL requests, checks each normal one is answered exactly as the
    engine answers it, and returns the hostile calls' responses."""
    want = [engine.generate([Request(b["prompt"], SamplingParams(max_new_tokens=8, temperature=0))])[0].text
            for b in NORMAL]

    def run(*hostile: Callable[[], httpx.Response]) -> list[httpx.Response]:
        with ThreadPoolExecutor(len(hostile) + len(NORMAL)) as pool:
            normal = [pool.submit(post, server, "/v1/completions", body) for body in NORMAL]
            answers = [pool.submit(call) for call in hostile]
            for r, text in zip([f.result() for f in normal], want):
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == text, r.text
            return [a.result() for a in answers]

    return run


def post(url: str, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=AUTH if headers is None else headers, timeout=120)


def error_of(r: httpx.Response, status: int, param: str | None, code: str | None) -> str:
    """The message of an OpenAI error answer with this status, param and code; it quotes no exception."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, r.text
    assert (error["param"], error["code"]) == (param, code), r.text
    assert "Error" not in error["message"] and "Traceback" not in error["message"], error["message"]
    return error["message"]


def test_every_route_wants_the_api_key(server, alongside) -> None:
    routes = [("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/v1/models/default", None),
              ("POST", "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 2}),
              ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 2})]
    wrong = [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
             {"Authorization": f"Bearer {KEY}x"}]

    def call(method: str, path: str, body: dict | None, headers: dict) -> Callable[[], httpx.Response]:
        return lambda: httpx.request(method, server + path, json=body, headers=headers, timeout=60)

    answers = alongside(*(call(m, p, b, h) for m, p, b in routes for h in [*wrong, AUTH]))
    for i, r in enumerate(answers):
        if i % (len(wrong) + 1) == len(wrong):
            assert r.status_code == 200, r.text
        else:
            error_of(r, 401, None, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_big_bodies_and_long_prompts_are_refused_before_tokenizing(server, alongside) -> None:
    huge = b'{"model": "default", "prompt": "' + b"x" * 50_000_000 + b'"}'

    def chunked():  # no Content-Length: the limit holds while the body streams in
        yield b'{"model": "default", "prompt": "'
        for _ in range(50):
            yield b"x" * 100_000
        yield b'"}'

    long_prompt = {"model": "default", "prompt": "statement " * 15_000}  # 150k characters: under the body limit
    long_chat = {"model": "default", "messages": [{"role": "user", "content": "statement " * 15_000}]}
    answers = alongside(lambda: post(server, "/v1/completions", huge),
                        lambda: httpx.post(f"{server}/v1/completions", content=chunked(), headers=AUTH, timeout=60),
                        lambda: post(server, "/v1/completions", long_prompt),
                        lambda: post(server, "/v1/chat/completions", long_chat))
    for r in answers[:2]:
        assert str(MAX_BODY) in error_of(r, 413, None, "request_too_large")
    assert "150000 characters" in error_of(answers[2], 400, "prompt", "context_length_exceeded")
    assert "characters" in error_of(answers[3], 400, "messages", "context_length_exceeded")


def test_stop_strings_are_bounded_in_number_and_length(server, alongside) -> None:
    base = {"model": "default", "prompt": "x", "max_tokens": 8}
    answers = alongside(lambda: post(server, "/v1/completions", {**base, "stop": ["a" * 300] * 4}),
                        lambda: post(server, "/v1/completions", {**base, "stop": ["a", "b", "c", "d", "e"]}),
                        lambda: post(server, "/v1/completions", {**base, "stop": ["a" * 100_000] * 4}))
    assert "1200 characters" in error_of(answers[0], 400, "stop", "invalid_value")
    error_of(answers[1], 400, "stop", "invalid_value")
    error_of(answers[2], 413, None, "request_too_large")


@pytest.mark.parametrize("body, param, code", [
    (b'{"model": "default", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "invalid_json"),
    (b'{"model": "default", "prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", "max_tokens", "invalid_value"),
    (b'{"model": "default", "prompt": [1, ' + b"9" * 5000 + b"]}", "prompt.1", "invalid_value"),
    (b'{"model": "default", "prompt": "a\\ud800b"}', "prompt", "invalid_value"),
    (b'{"model": "default", "prompt": ["ok", "\\udfff"]}', "prompt.1", "invalid_value"),
    (b'{"model": "default", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content",
     "invalid_value"),
    (b'{"model": "default", "prompt": "x", "stop": "\\udc00"}', "stop", "invalid_value"),
    (b'{"model": "default", "prompt": "x", "\\ud800": 1}', None, "invalid_value"),
    (b'{"model": "default", "prompt": "x", "temperature": NaN}', None, "invalid_json"),
    (b'{"model": "default", "prompt": "x", "temperature": 1e400}', "temperature", "invalid_value"),
    (b'{"model": "default", "prompt": "x", "seed": 18446744073709551616}', "seed", "invalid_value"),
    (b'{"model": "default", "prompt": "x\xff"}', None, "invalid_json"),
], ids=["deep", "huge-int", "huge-id", "surrogate", "surrogate-list", "surrogate-chat", "surrogate-stop",
        "surrogate-key", "nan", "inf", "seed-2^64", "not-utf8"])
def test_hostile_json_is_a_client_error_naming_the_field(server, alongside, body, param, code) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    [r] = alongside(lambda: post(server, path, body))
    message = error_of(r, 400, param, code)
    assert param is None or message.startswith(param)


def test_prompts_as_token_ids(server, engine, alongside) -> None:
    ids = [engine.tokenize(p) for p in ("The while loop", "Functions")]

    def want(prompt: list[int]) -> str:
        return engine.generate([Request(prompt, SamplingParams(max_new_tokens=6, temperature=0))])[0].text

    base = {"model": "default", "max_tokens": 6, "temperature": 0}
    vocab = engine.model.cfg.vocab_size
    one, many, outside, empty, empty_inner = alongside(
        lambda: post(server, "/v1/completions", {**base, "prompt": ids[0]}),
        lambda: post(server, "/v1/completions", {**base, "prompt": ids}),
        lambda: post(server, "/v1/completions", {**base, "prompt": [*ids[0], vocab]}),  # would fail its whole batch
        lambda: post(server, "/v1/completions", {**base, "prompt": []}),
        lambda: post(server, "/v1/completions", {**base, "prompt": [ids[0], []]}))
    assert one.status_code == 200 and one.json()["choices"][0]["text"] == want(ids[0]), one.text
    assert one.json()["usage"]["prompt_tokens"] == len(ids[0])
    assert many.status_code == 200 and [c["text"] for c in many.json()["choices"]] == [want(p) for p in ids]
    assert f"token id {vocab} is outside the vocabulary" in error_of(outside, 400, "prompt", "invalid_value")
    error_of(empty, 400, "prompt", "invalid_value")
    error_of(empty_inner, 400, "prompt.1", "invalid_value")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(prompt=ids[1], **base).choices[0].text == want(ids[1])


def test_models_retrieve_and_stream_options(server, checkpoint, alongside) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve("lazy").id == "lazy"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    listing = httpx.get(f"{server}/v1/models", headers=AUTH).text
    assert str(checkpoint) not in listing and checkpoint.name not in listing  # no paths of the server's disks
    [options] = alongside(lambda: post(server, "/v1/completions", {"model": "default", "prompt": "x",
                                                                     "stream_options": {"include_usage": True}}))
    error_of(options, 400, "stream_options", "invalid_value")


def test_overload_answers_a_plain_503(server) -> None:
    body = {"model": "lazy", "prompt": "x", "max_tokens": 40, "ignore_eos": True}  # 2 ongoing + 2 queued fit
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(server, "/v1/completions", body), range(12)))
    assert {r.status_code for r in answers} <= {200, 503, 504}, [r.text for r in answers]
    busy = [r for r in answers if r.status_code == 503]
    assert busy, [r.status_code for r in answers]
    for r in busy:
        assert error_of(r, 503, None, "overloaded") == "model 'lazy' is at capacity; retry later"
        assert r.headers["retry-after"] == "1"


def test_a_trickled_body_times_out(server, alongside) -> None:
    host, port = server.removeprefix("http://").split(":")

    def trickle() -> bytes:
        body = b'{"model": "default", "prompt": "x"}'
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
            answer = b""
            while b"}}" not in answer:  # the rest of the body never comes
                answer += s.recv(65536) or b"}}"
            return answer

    [answer] = alongside(lambda: trickle())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"


# ---- fuzz ---------------------------------------------------------------------------------------------------------

INT_FIELDS = ["max_tokens", "n", "top_k", "seed", "logprobs", "best_of"]
FLOAT_FIELDS = ["temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
BOOL_FIELDS = ["stream", "echo", "ignore_eos"]
TEXTS = ["", "x", "\u202e\u0000\t", "😀" * 3, "\ud800", "a\udfffb", "\U0010ffff", "名前"]


def wrong_value(rng: random.Random, kind: str) -> object:
    """A value no field of this kind accepts ("BIG": a 5000-digit integer, "NAN": NaN or an infinity, see `encode`)."""
    shapes = ["5", [], [1], {}, {"a": None}]
    return rng.choice({
        "int": [1.5, 1e-300, -1e-300, 5e-324, 1e300, 2.0, -(2 ** 80), 2 ** 80, "BIG", True, "\ud800", *shapes],
        "float": [-1e300, -5e-324, "BIG", "NAN", None, True, "\ud800", *shapes],
        "bool": [0, 1, 1.0, None, "true", *shapes],
        "text": [0, 1e-300, 2 ** 70, "BIG", True, "\ud800", "a\udfff", [], [1], {}],
    }[kind])


def defect(rng: random.Random, body: dict, chat: bool) -> dict:
    """`body` with one thing wrong in it."""
    field_kinds = [(f, "int") for f in INT_FIELDS] + [(f, "float") for f in FLOAT_FIELDS] + \
                  [(f, "bool") for f in BOOL_FIELDS] + [("model", "text"), ("user", "text")]
    choice = rng.randrange(9)
    if choice == 0:  # a wrong type or an out-of-range number
        name, kind = rng.choice(field_kinds)
        if chat and name in ("logprobs", "best_of", "echo"):
            name, kind = "max_tokens", "int"
        return {**body, name: wrong_value(rng, kind)}
    if choice == 1:  # an unknown field, its name as strange as it gets
        name = rng.choice(["max_token", "\ud800", "x" * 1000, "名前", ""]) + str(rng.random())
        return {**body, name: rng.choice(TEXTS)}
    if choice == 2:  # a missing required field
        return {k: v for k, v in body.items() if k != rng.choice(["model", "messages" if chat else "prompt"])}
    if choice == 3:  # out-of-range values of the right type
        name, value = rng.choice([("max_tokens", 0), ("max_tokens", 10 ** 9), ("n", 0), ("n", 9), ("top_k", -2),
                                  ("temperature", 2.5), ("temperature", -1e-300), ("top_p", 0), ("top_p", 1.5),
                                  ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("presence_penalty", 1e-300),
                                  ("seed", 2 ** 63), ("stop", ["a"] * 5), ("stop", [""]), ("stop", "s" * 1025),
                                  ("logit_bias", {"1": 1e300}), ("model", "\U0001f600" * 40)])
        return {**body, name: value}
    if choice == 7:
        return {**body, "stream": False, "stream_options": {"include_usage": True}}
    if choice == 4 and chat:  # a broken message
        message = rng.choice([{}, {"role": "robot", "content": "x"}, {"role": "user"}, {"role": "user", "content": 5},
                              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                              {"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "content": "\udbff"},
                              "user: hi", None, []])
        return {**body, "messages": rng.choice([[message], [{"role": "user", "content": "x"}, message], [], "hi"])}
    if choice == 4:  # a broken prompt
        prompt = rng.choice([[], [[]], [[1], []], [1, "a"], [-1], [2 ** 31], [True], {"text": "x"}, None, 1e-300,
                             "\ud800", ["ok", "\udc00"], [512], [[3], [2 ** 31 - 1]], "statement " * 2_000])
        return {**body, "prompt": prompt}
    if choice == 5:  # nested deep
        return {**body, rng.choice(["prompt", "stop", "user", "logit_bias"]): "DEEP"}
    if choice == 6:  # a number no Python int conversion takes
        return {**body, rng.choice(["max_tokens", "seed", "n", "temperature"]): "BIG"}
    return {**body, "stop": rng.choice([5, [None], [["a"]], {"a": "b"}, True, [""], ""])}


def encode(body: dict, rng: random.Random) -> bytes:
    """The JSON text of `body`, with the placeholders no encoder writes: 5000-digit integers, NaN, deep nesting."""
    text = json.dumps(body)
    text = text.replace('"BIG"', "9" * 5000).replace('"NAN"', rng.choice(["NaN", "Infinity", "-Infinity"]))
    text = text.replace('"DEEP"', "[" * 5_000 + "]" * 5_000)  # well past the parser's recursion limit
    return text.encode()


def malformed(rng: random.Random) -> tuple[str, bytes]:
    chat = rng.random() < 0.5
    body = {"model": "default", "max_tokens": 4, "stream": rng.random() < 0.3}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "The if"})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    kind = rng.randrange(10)
    if kind == 0:  # a strict prefix of a JSON object is never JSON
        text = encode(body, rng)
        return path, text[:rng.randrange(len(text) - 1)]
    if kind == 1:  # no JSON object at all
        return path, rng.choice([b"null", b"[]", b"5", b'"x"', b"", b"\xff\xfe", b"{\x00}", b"[" * 5_000])
    for _ in range(rng.choice([1, 1, 2, 3])):
        body = defect(rng, body, chat)
    return path, encode(body, rng)


def test_a_fuzz_of_malformed_requests_gets_only_openai_client_errors(server, alongside) -> None:
    rng = random.Random(16)
    requests = [malformed(rng) for _ in range(300)]

    def send_all() -> list[httpx.Response]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda r: post(server, *r), requests))

    [answers] = alongside(lambda: send_all())
    for (path, body), r in zip(requests, answers):
        assert 400 <= r.status_code < 500, (path, body[:300], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), r.text
    assert httpx.get(f"{server}/health", headers=AUTH).status_code == 200


# ---- replicas -----------------------------------------------------------------------------------------------------

def health(server: str) -> httpx.Response:
    return httpx.get(f"{server}/health", headers=AUTH, timeout=60)


def test_health_follows_the_replicas_and_a_model_without_one_answers_503_at_once(server) -> None:
    assert health(server).json() == {"status": "ok", "models": {"default": "ready", "lazy": "ready"}}
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::raytrain#model-default#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 60
    while (down := health(server)).status_code == 200:  # each /health probes afresh
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert down.status_code == 503 and down.json()["models"] == {"default": "down", "lazy": "ready"}, down.text
    # no waiting for the replacement: while health says down, requests to the model are refused, the other serves
    refused = post(server, "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 4})
    still = health(server)
    assert error_of(refused, 503, None, "unavailable") == "model 'default' has no running replica; retry"
    assert still.status_code == 503 and refused.headers["retry-after"] == "1"
    assert post(server, "/v1/completions", {"model": "lazy", "prompt": "x", "max_tokens": 4}).status_code == 200
    deadline = time.monotonic() + 180
    while health(server).status_code != 200:  # Serve replaces the replica
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert post(server, "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 4}).status_code == 200
