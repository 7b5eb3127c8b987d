"""Chat with images, without Ray: OpenAI image content parts in the wire format, and a VLM replica that answers a
base64 data-URL image exactly as the generation loop does, and refuses what it cannot take, naming the field."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random

import pytest
import torch

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.data import shapes
from raytrain.data.tokenizer import to_files
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.vlm import VLMRequest, generate, pixels
from raytrain.models.decoder import build_decoder
from raytrain.models.vlm import build_vlm
from serving.config import model_args, model_spec
from serving.model import ModelServer
from serving.protocol import ApiError, ChatRequest, parse
from tests.models.test_vlm import DECODER, make
from tests.serving.test_model import PARAMS, TOKENIZER_TEMPLATE

PNG = shapes.png_bytes(shapes.render(shapes.generate_scene(random.Random(0), shapes.WorldConfig()), 64))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def chat(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def image_part(url: str = DATA_URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_parts_become_a_placeholder_and_a_url() -> None:
    body = {"model": "m", "messages": chat({"type": "text", "text": "What is "}, image_part(),
                                            {"type": "text", "text": " this?"})}
    req = parse(ChatRequest, json.dumps(body).encode())
    assert req.messages[0].plain() == {"role": "user", "content": "What is <image> this?"}
    assert req.messages[0].image_urls() == [DATA_URL]
    bad = {"model": "m", "messages": chat({"type": "image_url", "image_url": {"uri": "x"}})}
    with pytest.raises(ApiError) as e:
        parse(ChatRequest, json.dumps(bad).encode())
    assert (e.value.code, e.value.param) == ("missing_required_parameter", "messages.0.content.0.image_url.url")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tokenizer):
    decoder = dataclasses.replace(DECODER, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = build_vlm(dataclasses.replace(make().cfg, decoder=decoder))
    tokenizer.chat_template = TOKENIZER_TEMPLATE
    try:
        files = to_files(tokenizer)
    finally:
        tokenizer.chat_template = None
    root = tmp_path_factory.mktemp("vlm")
    vlm = save_pretrained(root / "vlm", model.cfg, model_state(model), files)
    text = save_pretrained(root / "text", decoder, model_state(build_decoder(decoder)), files)
    spec = lambda path: model_spec({"checkpoint": str(path), "limits": {"max_prompt_tokens": 60,  # noqa: E731
                                                                        "max_output_tokens": 20}}, "test")
    return {name: ModelServer.func_or_class(name, model_args(spec(path))) for name, path in
            (("vlm", vlm), ("text", text))}


@torch.inference_mode()
def test_a_vlm_replica_answers_about_the_image_as_the_generation_loop_does(servers) -> None:
    server = servers["vlm"]
    params = {**PARAMS, "max_tokens": 5, "ignore_eos": True}
    job = {"messages": [{"role": "user", "content": "Look: <image> How many?"}], "images": [DATA_URL],
           "params": params}  # what the ingress makes of a text, image_url, text message
    answer = asyncio.run(server.generate(job))
    tok, model = server.engine.tokenizer, server.engine.model
    before = tok.encode("<s><user>Look: ", add_special_tokens=False)
    after = tok.encode(" How many?<assistant>", add_special_tokens=False)
    ids = generate(model, [VLMRequest(before, after, pixels(PNG, 64),
                                      SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))],
                   tok.eos_token_id, tok.pad_token_id)[0]
    assert answer["text"] == tok.decode(ids, skip_special_tokens=True)
    assert (answer["finish_reason"], answer["completion_tokens"], answer["prompt_tokens"]) == \
        ("length", 5, len(before) + len(after))
    text_only = asyncio.run(server.generate({"messages": [{"role": "user", "content": "hi"}], "params": params}))
    assert text_only["completion_tokens"] == 5


@pytest.mark.parametrize("server_name, content, urls, param, message", [
    ("text", "<image> hi", [DATA_URL], "messages", "is a language model; it takes no images"),
    ("vlm", "<image> <image>", [DATA_URL, DATA_URL], "messages", "2 images"),
    ("vlm", "<image> hi", ["https://example.com/cat.png"], "image_url.url", "only base64 data URLs"),
    ("vlm", "<image> hi", ["data:image/png;base64,%%%"], "image_url.url", "not valid base64"),
    ("vlm", "<image> hi", ["data:image/png;base64," + base64.b64encode(b"not a png").decode()], "messages",
     "the image does not decode"),
    ("vlm", "what is <image>?", [], "messages", "holds the image placeholder <image> but the request has no image"),
])
def test_what_a_replica_cannot_take_is_a_client_error_naming_the_field(servers, server_name, content, urls, param,
                                                                       message) -> None:
    job = {"messages": [{"role": "user", "content": content}], "images": urls, "params": PARAMS}
    answer = asyncio.run(servers[server_name].generate(job))
    error_message, error_param, code, status = answer["error"]
    assert (error_param, code, status) == (param, "invalid_value", 400) and message in error_message
