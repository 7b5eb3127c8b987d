"""LoRA adapters served over real HTTP: `model="default:a"` runs adapter a on the `default` replica's base, requests
of two adapters and of the base share decode steps and each gets exactly the tokens of its adapter alone
(`Engine.from_checkpoint(..., adapter=...)`), streamed too; `/v1/models` lists the adapters; an unknown adapter, or
an adapter asked of a model that does not hold it, is a 404 naming `model`."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from raytrain.infer.engine import Engine
from tests.serving.conftest import AUTH
from tests.serving.test_api import chat_ids, events, expect, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def alone(checkpoint, adapters) -> dict[str, Engine]:
    """What each served `model` value should equal: the base alone, and the base with one adapter attached."""
    return {"default": Engine.from_checkpoint(checkpoint),
            **{f"default:{name}": Engine.from_checkpoint(checkpoint, adapter=path) for name, path in adapters.items()}}


def test_the_adapters_are_listed_as_models_of_their_base(server) -> None:
    card = httpx.get(f"{server}/v1/models/default:b", headers=AUTH).json()
    assert card["id"] == "default:b" and card["parent"] == "default" and card["object"] == "model"
    assert "parent" not in httpx.get(f"{server}/v1/models/default", headers=AUTH).json()


def test_two_adapters_and_the_base_in_one_batch_each_give_their_own_tokens(server, alone) -> None:
    handle = serve.get_deployment_handle("model-default", "raytrain")
    before = handle.stats.remote().result()
    jobs = [("default:a", "The if statement"), ("default:b", "The if statement"), ("default", "The if statement"),
            ("default:b", "A class definition"), ("default:a", "The while loop")]
    bodies = [{"model": model, "prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
              for model, prompt in jobs]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, "/v1/completions", b), bodies))
    texts = []
    for (model, prompt), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts.append(r.json()["choices"][0]["text"])
        assert texts[-1] == expect(alone[model], prompt, max_new_tokens=64, temperature=0, ignore_eos=True).text
    assert len(set(texts[:3])) == 3  # one prompt: a, b and the base answer differently
    after = handle.stats.remote().result()
    rows = Counter(after["decode_rows"]) - Counter(before["decode_rows"])
    assert max(rows) == 4  # 4 of the 5 requests in one decode step: at least one of a and one of b among them
    assert after["adapter_loads"] - before["adapter_loads"] <= 2  # two slots: a and b loaded once, never evicted


def test_a_streamed_chat_with_an_adapter_equals_that_adapter_alone(server, alone) -> None:
    messages = [{"role": "user", "content": "Explain the for statement."}]
    r = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=120,
                   json={"model": "default:b", "messages": messages, "max_tokens": 20, "temperature": 0,
                         "stream": True})
    assert r.status_code == 200, r.text
    data = events(r.text.splitlines())
    want = expect(alone["default:b"], chat_ids(alone["default:b"], messages), max_new_tokens=20, temperature=0)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in data[:-1]) == want.text
    assert {c["model"] for c in data[:-1]} == {"default:b"}


@pytest.mark.parametrize("model", ["default:zz", "lazy:a", "default:", "nothing:a"])
def test_an_adapter_nobody_serves_is_a_404_naming_model(server, model) -> None:
    for path, body in (("/v1/completions", {"model": model, "prompt": "x"}),
                       ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}],
                                                 "stream": True})):
        r = post(server, path, body)
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and error["code"] == "model_not_found" and repr(model) in error["message"]
    assert httpx.get(f"{server}/v1/models/{model}", headers=AUTH).status_code == 404
