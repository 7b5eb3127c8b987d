"""The OpenAI-compatible API over real HTTP against a local Serve instance: completions and chat, streamed and not,
equal to the engine and to `raytrain generate`; concurrent requests batched and each answered right; two models side
by side; every error case as OpenAI-style JSON naming the field; overload (503 + Retry-After, nothing lost);
timeouts (504, replica freed); the `openai` client; and a killed replica (clean 5xx, then Serve restarts it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from raytrain.infer.engine import Completion, Engine, EngineConfig, Request
from raytrain.infer.lazyllm import LazyConfig
from raytrain.infer.rag import PLAIN_CHAT_TEMPLATE, forkjoin_prompt
from raytrain.infer.sampling import SamplingParams
from tests.conftest import REPO
from tests.serving.conftest import API_KEY, AUTH, DOCUMENTS

pytestmark = pytest.mark.integration
LONG_PROMPT = ("The if statement is used for conditional execution: it selects exactly one of the suites by "
               "evaluating the expressions one by one until one is found to be true.")


@pytest.fixture(scope="module")
def engines(checkpoint) -> dict[str, Engine]:
    """The engines the two served models should equal, in this process."""
    lazy = EngineConfig(max_batch_size=2, lazy=True, lazyllm=LazyConfig(min_prompt_tokens=16))
    return {"default": Engine.from_checkpoint(checkpoint), "lazy": Engine.from_checkpoint(checkpoint, lazy)}


def post(url: str, path: str, body: dict | bytes, timeout: float = 120) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers=AUTH, timeout=timeout)
    return httpx.post(url + path, json=body, headers=AUTH, timeout=timeout)


def events(lines) -> list[dict | str]:
    """The data of each server-sent event: parsed JSON, or the final '[DONE]'."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def expect(engine: Engine, prompt: str | list[int], **params) -> Completion:
    return engine.generate([Request(prompt, SamplingParams(**params))])[0]


def chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    return engine.tokenizer.apply_chat_template(messages, chat_template=PLAIN_CHAT_TEMPLATE,
                                                add_generation_prompt=True, tokenize=True, return_dict=False)


def test_models_and_health(server) -> None:
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["default", "default:a",
                                                                               "default:b", "lazy"]
    health = httpx.get(f"{server}/health", headers=AUTH)
    assert health.status_code == 200 and health.json() == {"status": "ok",
                                                           "models": {"default": "ready", "lazy": "ready"}}
    assert serve.get_deployment_handle("model-lazy", "raytrain").info.remote().result()["decoding"] == "lazyllm"


def test_greedy_completion_equals_the_engine_and_raytrain_generate(server, checkpoint, engines) -> None:
    r = post(server, "/v1/completions", {"model": "default", "prompt": "The if statement", "max_tokens": 24,
                                         "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expect(engines["default"], "The if statement", max_new_tokens=24, temperature=0)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": want.text, "finish_reason": want.finish_reason,
                                "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": len(want.token_ids),
                             "total_tokens": want.prompt_tokens + len(want.token_ids)}
    cli = subprocess.run([sys.executable, "-m", "raytrain", "generate", f"checkpoint={checkpoint}",
                          "prompt=The if statement", "temperature=0", "max_new_tokens=24", "device=cpu"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == "The if statement" + body["choices"][0]["text"] + "\n"


def test_a_streamed_completion_is_openai_chunks_joining_to_the_whole_one(server, engines) -> None:
    body = {"model": "default", "prompt": "A class definition", "max_tokens": 30, "temperature": 0.8, "seed": 7,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = events(r.iter_lines())
    assert data[-1] == "[DONE]"
    chunks, usage = data[:-2], data[-2]
    want = expect(engines["default"], "A class definition", max_new_tokens=30, temperature=0.8, seed=7)
    assert len(chunks) > 2 and all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == want.finish_reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.token_ids)


def test_chat_renders_the_template_streamed_or_not(server, engines) -> None:
    messages = [{"role": "system", "content": "You write Python documentation."},
                {"role": "user", "content": [{"type": "text", "text": "Explain the while statement."}]}]
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
             for m in messages]
    ids = chat_ids(engines["default"], plain)
    want = expect(engines["default"], ids, max_new_tokens=20, temperature=0)
    r = post(server, "/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": 20,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": "default", "messages": messages, "max_completion_tokens": 20, "temperature": 0,
                            "stream": True}) as s:
        data = events(s.iter_lines())
    assert data[-1] == "[DONE]" and data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in data[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in data[:-1]) == want.text
    assert data[-2]["choices"][0]["finish_reason"] == want.finish_reason


def test_rag_chat_answers_from_documents_by_superposition_or_naively(server, checkpoint, engines, tmp_path) -> None:
    engine, handle = engines["default"], serve.get_deployment_handle("model-default", "raytrain")
    messages = [{"role": "user", "content": "What is the while statement used for?"}]
    for mode, top_k in (("superposition", 1), ("superposition", 0), ("naive", None)):
        prompt = forkjoin_prompt(engine.tokenizer, DOCUMENTS, messages[0]["content"], template=PLAIN_CHAT_TEMPLATE)
        prompt.superpose, prompt.top_k = mode == "superposition", top_k
        want = engine.generate([Request(params=SamplingParams(max_new_tokens=12, temperature=0), forkjoin=prompt)])[0]
        rag = {"documents": DOCUMENTS, "mode": mode, **({} if top_k is None else {"top_k": top_k})}
        hits = handle.stats.remote().result()["path_cache"]["hits"]
        r = post(server, "/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": 12,
                                                  "temperature": 0, "rag": rag})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["usage"]["prompt_tokens"] == len(prompt.flat())
        if mode == "naive":
            assert "kept_documents" not in body["choices"][0]
            continue
        kept = body["choices"][0]["kept_documents"]
        assert kept == want.superposition.kept and len(kept) == (1 if top_k else len(DOCUMENTS))
        if top_k == 0:  # the same documents again: their paths come from the replica's path cache
            assert handle.stats.remote().result()["path_cache"]["hits"] >= hits + len(DOCUMENTS)
        stored = post(server, "/v1/chat/completions", {"model": "default", "messages": messages, "max_tokens": 12,
                                                       "temperature": 0, "rag": {**rag, "store": "python",
                                                                                 "documents": None}})
        assert stored.status_code == 200 and stored.json()["choices"] == body["choices"], stored.text
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": "default", "messages": messages, "max_tokens": 12, "temperature": 0,
                            "stream": True, "rag": {"documents": DOCUMENTS, "mode": "superposition"}}) as s:
        data = events(s.iter_lines())
    prompt.superpose, prompt.top_k = True, None
    want = engine.generate([Request(params=SamplingParams(max_new_tokens=12, temperature=0), forkjoin=prompt)])[0]
    assert data[-1] == "[DONE]" and "".join(c["choices"][0]["delta"].get("content", "") for c in data[:-1]) == want.text
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    cli = subprocess.run([sys.executable, "-m", "raytrain", "generate", f"checkpoint={checkpoint}", "device=cpu",
                          f"rag.documents={tmp_path / 'docs.jsonl'}", f"rag.question={messages[0]['content']}",
                          "generation=superposition", "temperature=0", "max_new_tokens=12"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    kept = ", ".join(str(d + 1) for d in want.superposition.kept)
    assert cli.stdout == want.text + "\n" and f"superposition: kept document(s) {kept} of 3" in cli.stderr


def test_concurrent_requests_are_batched_and_each_answered_right(server, engines) -> None:
    prompts = ["The if statement", "A class definition", "The while loop", "x", "Assignment statements",
               "The for statement", "Functions", "import"]
    bodies = [{"model": "default", "prompt": p, "max_tokens": 8 + 3 * i, "temperature": 0 if i % 2 else 0.9,
               "seed": i} for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, "/v1/completions", b), bodies))
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        want = expect(engines["default"], body["prompt"], max_new_tokens=body["max_tokens"],
                      temperature=body["temperature"], seed=body["seed"])
        assert r.json()["choices"][0]["text"] == want.text
    rows = serve.get_deployment_handle("model-default", "raytrain").stats.remote().result()["decode_rows"]
    assert max(rows) > 1  # requests shared decode steps


def test_the_lazyllm_model_serves_beside_the_plain_one(server, engines) -> None:
    assert len(engines["lazy"].encode(Request(LONG_PROMPT))) >= 16  # long enough for the LazyLLM path
    for model in ("lazy", "default"):
        r = post(server, "/v1/completions", {"model": model, "prompt": LONG_PROMPT, "max_tokens": 12,
                                             "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expect(engines[model], LONG_PROMPT, max_new_tokens=12,
                                                        temperature=0).text


COMPLETION = {"model": "default", "prompt": "x"}
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
ERRORS = [  # path, body, status, param, code
    ("/v1/completions", b'{"model": "default", "prompt": ', 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ("/v1/completions", {"model": "default"}, 400, "prompt", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "default", "messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"model": "default", "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user"}]}, 400, "messages.0.content",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", "invalid_type"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "n": 9}, 400, "n", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 5000}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 5000, "stream": True}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**COMPLETION, "prompt": "statement " * 1100}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": "statement " * 900, "max_tokens": 1500}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "max_token": 5}, 400, "max_token", "unknown_parameter"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {**COMPLETION, "stop": ["", "a"]}, 400, "stop", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a"] * 65}}, 400, "rag.documents", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": []}}, 400, "rag.documents", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a", " \n"]}}, 400, "rag.documents.1", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a"], "mode": "magic"}}, 400, "rag.mode", "invalid_type"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a"], "top_k": -1}}, 400, "rag.top_k", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a"], "store": "python"}}, 400, "rag", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"mode": "naive"}}, 400, "rag", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"store": "java"}}, 400, "rag.store", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "rag": {"documents": ["a"] * 60 + ["statement " * 1100]}}, 400, "rag.documents",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "assistant", "content": "x"}],
                              "rag": {"documents": ["a"]}}, 400, "messages", "invalid_value"),
]


@pytest.mark.parametrize("path, body, status, param, code", ERRORS,
                         ids=[f"{i}-{e[3] or e[4]}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param, code) -> None:
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert param is None or param in error["message"]


def test_unknown_routes_answer_openai_errors(server) -> None:
    r = httpx.get(f"{server}/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def test_overload_answers_503_with_retry_after_and_loses_nothing(server) -> None:
    body = {"model": "default", "prompt": "The if statement", "max_tokens": 64, "ignore_eos": True}
    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda _: post(server, "/v1/completions", body), range(40)))
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(busy) == 40 and ok and busy, [r.status_code for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 64 for r in ok)
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in busy), [(r.headers, r.text) for r in busy]


def test_a_timed_out_request_answers_504_and_frees_the_replica(server) -> None:
    endless = {"model": "lazy", "prompt": "x", "max_tokens": 2000, "ignore_eos": True}  # longer than 1.5 s
    r = post(server, "/v1/completions", endless)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    with httpx.stream("POST", f"{server}/v1/completions", json={**endless, "stream": True}, headers=AUTH,
                      timeout=60) as s:
        data = events(s.iter_lines())
    assert data[-1] == "[DONE]" and data[-2]["error"]["code"] == "timeout" and len(data) > 2
    # the replica stopped generating both, so a short request is answered within the same 1.5 s budget
    r = post(server, "/v1/completions", {"model": "lazy", "prompt": "x", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_the_openai_client_works_unchanged(server, engines) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["default", "default:a", "default:b", "lazy"]
    completion = client.completions.create(model="default", prompt="The while loop", max_tokens=16, temperature=0,
                                           extra_body={"top_k": 5})
    assert completion.choices[0].text == expect(engines["default"], "The while loop", max_new_tokens=16,
                                                temperature=0, top_k=5).text
    messages = [{"role": "user", "content": "Explain the for statement."}]
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = expect(engines["default"], chat_ids(engines["default"], messages), max_new_tokens=16, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="default", messages=messages, temperature=3)
    assert bad.value.param == "temperature"


def replica_actors(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::raytrain#{deployment}#")]


def test_a_killed_replica_fails_its_requests_cleanly_and_serve_restarts_it(server) -> None:
    handle = serve.get_deployment_handle("model-default", "raytrain")
    steps = handle.stats.remote().result()["steps"]
    long = {"model": "default", "prompt": "x", "max_tokens": 2000, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "/v1/completions", long)
        deadline = time.monotonic() + 60
        while handle.stats.remote().result()["steps"] == steps:  # until the engine runs it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.stream("POST", f"{server}/v1/completions", headers=AUTH, timeout=120,
                          json={"model": "default", "prompt": "y", "max_tokens": 8, "stream": True}) as queued:
            assert queued.status_code == 200  # accepted by the replica, running beside the long one
            [name] = replica_actors("model-default")
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            data = events(queued.iter_lines())
        failed = running.result()
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "unavailable", failed.text
    assert data[-1] == "[DONE]" and data[-2]["error"]["code"] == "unavailable"
    deadline, answers = time.monotonic() + 180, []
    while not answers or answers[-1].status_code != 200:  # Serve replaces the replica; clients retry on 503
        assert time.monotonic() < deadline, [a.text for a in answers]
        answers.append(post(server, "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 4}))
        assert answers[-1].status_code in (200, 503) and (answers[-1].status_code == 200
                                                          or answers[-1].json()["error"]["code"] == "unavailable")
        time.sleep(0.5)
    assert replica_actors("model-default") != [name]


def test_n_seeded_choices_differ_and_repeat(server, engines) -> None:
    body = {"model": "default", "prompt": "The if statement", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    first, again = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    texts = [c["text"] for c in first.json()["choices"]]
    assert first.status_code == 200 and len(set(texts)) == 3, texts  # seeds 7, 8, 9
    assert [c["text"] for c in again.json()["choices"]] == texts
    assert texts[1] == expect(engines["default"], "The if statement", max_new_tokens=12, temperature=1.0, seed=8).text


def test_extreme_sampling_values_fail_alone_or_run_greedy(server, engines) -> None:
    """A seed past 64 bits or a vanishing repetition penalty is a 400 naming the field; a vanishing temperature is
    greedy (vLLM's rule); requests batched beside them are answered exactly."""
    normal = {"model": "default", "prompt": "A class definition", "max_tokens": 10, "temperature": 0}
    hostile = [{"seed": 2 ** 64}, {"seed": -2 ** 63 - 1}, {"repetition_penalty": 1e-300, "temperature": 1},
               {"temperature": 1e-300}]
    bodies = [normal, *({**normal, "prompt": "x", **h} for h in hostile), normal]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(server, "/v1/completions", b), bodies))
    want = expect(engines["default"], "A class definition", max_new_tokens=10, temperature=0).text
    assert [a.json()["choices"][0]["text"] for a in (answers[0], answers[-1])] == [want, want]
    assert [(a.status_code, a.json()["error"]["param"]) for a in answers[1:4]] == [
        (400, "seed"), (400, "seed"), (400, "repetition_penalty")]
    greedy = expect(engines["default"], "x", max_new_tokens=10, temperature=0).text
    assert answers[4].status_code == 200 and answers[4].json()["choices"][0]["text"] == greedy
