"""The model deployment's request preparation, without Ray: the chat template comes from the config, else the
tokenizer, else the plain fallback; limits and template errors become client errors naming the field; a prompt too
long to fit is refused before it is tokenized, and token ids outside the vocabulary are refused."""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
import ray
import torch

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.config import RaytrainError
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, build_decoder
from serving.config import model_args, model_spec
from raytrain.data.corpus import documents
from raytrain.infer.rag import PLAIN_CHAT_TEMPLATE
from serving.model import ModelServer, RequestError, longest_token_chars
from tests.conftest import local_ray

TOKENIZER_TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
CONFIG_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ raise_exception('no system messages') }}{% endif %}[{{ m['content'] }}]{% endfor %}")
MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = {"max_tokens": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "stop": [],
          "seed": None, "ignore_eos": False}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """The same random model twice: with a tokenizer that has a chat template, and with one that has none."""
    cfg = DecoderConfig(name="chat", vocab_size=512, d_model=32, n_layers=2, head_dim=16, q_heads=2, kv_heads=2,
                        ffn_dim=64, max_seq_len=64)
    state = model_state(build_decoder(cfg))
    plain = save_pretrained(tmp_path_factory.mktemp("m") / "plain", cfg, state, to_files(tokenizer))
    tokenizer.chat_template = TOKENIZER_TEMPLATE
    try:
        templated = save_pretrained(tmp_path_factory.mktemp("m") / "templated", cfg, state, to_files(tokenizer))
    finally:
        tokenizer.chat_template = None
    return {"plain": plain, "templated": templated}


def server(checkpoint, **fields) -> ModelServer:
    spec = model_spec({"checkpoint": str(checkpoint), "limits": {"max_prompt_tokens": 60, "max_output_tokens": 20},
                       **fields}, "test")
    return ModelServer.func_or_class("m", model_args(spec))


def rendered(server: ModelServer, messages: list[dict]) -> str:
    request = server.prepare({"messages": messages, "params": PARAMS})
    return server.engine.tokenizer.decode(request.prompt)


@torch.inference_mode()
def test_the_chat_template_comes_from_config_then_tokenizer_then_the_plain_fallback(checkpoints) -> None:
    assert server(checkpoints["plain"]).chat_template == PLAIN_CHAT_TEMPLATE
    assert rendered(server(checkpoints["plain"]), MESSAGES) == "<s>user: hi\nassistant:"
    assert rendered(server(checkpoints["templated"]), MESSAGES) == "<s><user>hi<assistant>"
    configured = server(checkpoints["templated"], chat_template=CONFIG_TEMPLATE)
    assert rendered(configured, MESSAGES) == "<s>[hi]"
    with pytest.raises(RequestError) as e:
        rendered(configured, [{"role": "system", "content": "x"}, *MESSAGES])
    assert e.value.args[1] == "messages" and "no system messages" in e.value.args[0]


@torch.inference_mode()
def test_limits_are_client_errors_naming_the_field(checkpoints) -> None:
    model = server(checkpoints["plain"])
    chat = model.prepare({"messages": MESSAGES, "params": PARAMS})
    assert chat.params.max_new_tokens == 20  # chat's default: as many as the limit and the window allow
    cases = [({"prompt": [5] * 61}, "prompt", "context_length_exceeded"),  # window 64, limits 60 in + 20 out
             ({"prompt": "x", "params": {**PARAMS, "max_tokens": 21}}, "max_tokens", "invalid_value"),
             ({"prompt": [5] * 50, "params": {**PARAMS, "max_tokens": 20}}, "max_tokens", "context_length_exceeded"),
             ({"prompt": ""}, "prompt", None)]
    for job, param, code in cases:
        with pytest.raises(RequestError) as e:
            model.prepare({"params": PARAMS, **job})
        assert e.value.args[1:3] == (param, code), e.value.args


def test_no_text_tokenizes_into_fewer_tokens_than_its_length_over_the_longest_token(tokenizer) -> None:
    longest, rng = longest_token_chars(tokenizer), random.Random(0)
    texts = documents()[:20] + ["".join(rng.choice("ab \n的😀é\u0301\t\u202e") for _ in range(rng.randrange(1, 400)))
                                for _ in range(200)]
    for text in texts:  # the bound the character cap relies on
        assert len(tokenizer.encode(text, add_special_tokens=False)) * longest >= len(text), text


def rag_checkpoint(tmp_path, tokenizer):
    """A random model with a 160-token window and a tokenizer with a chat template."""
    cfg = DecoderConfig(name="rag", vocab_size=512, d_model=32, n_layers=2, head_dim=16, q_heads=2, kv_heads=2,
                        ffn_dim=64, max_seq_len=160)
    tokenizer.chat_template = TOKENIZER_TEMPLATE
    try:
        return save_pretrained(tmp_path / "rag", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    finally:
        tokenizer.chat_template = None


def test_a_sharded_store_answers_as_the_replica_alone(tmp_path, tokenizer) -> None:
    """Two shard actors (Ray) score the store's paths and send the kept ones: the same answer, kept documents and
    first tokens as the replica holding every document, and each shard warmed its part as it started."""
    local_ray()
    checkpoint = rag_checkpoint(tmp_path, tokenizer)
    docs = ["The if statement.", "A class.", "The while loop.", "A list of items.", "The return value."]
    (tmp_path / "python.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    settings = {"engine": {"superposition": {"enabled": True, "top_k": 2}}, "document_stores": {"python": str(
        tmp_path / "python.jsonl")}, "limits": {"max_prompt_tokens": 120, "max_output_tokens": 8}}
    alone = server(checkpoint, **settings)
    shards = server(checkpoint, **settings, store_shards={"count": 2, "num_cpus": 0})
    assert shards.info()["store_shards"] == 2 and len(shards.shards["python"]) == 2
    assert shards.engine.superposer.cache.stats()["entries"] == 0  # the documents' KV lives in the shards
    job = {"messages": MESSAGES, "params": {**PARAMS, "max_tokens": 8},
           "rag": {"documents": None, "store": "python", "mode": None, "top_k": None}}
    answers = [asyncio.run(model.generate(job)) for model in (alone, shards)]
    assert answers[1] == answers[0] and len(answers[0]["kept_documents"]) == 2
    assert asyncio.run(shards.generate({**job, "rag": {**job["rag"], "top_k": 1}}))["kept_documents"] == \
        asyncio.run(alone.generate({**job, "rag": {**job["rag"], "top_k": 1}}))["kept_documents"]
    naive = {**job, "rag": {**job["rag"], "mode": "naive"}}  # one prompt: the replica alone, shards unused
    assert asyncio.run(shards.generate(naive)) == asyncio.run(alone.generate(naive))
    scored = ray.get(shards.shards["python"][1].score.remote("q", *prompt_parts(shards, job)))
    assert scored.cached == 2  # warmed as the shard started
    restart(shards.shards["python"][0])  # a shard dies: it starts again, warm
    assert asyncio.run(shards.generate(job)) == answers[0]
    shard, question = shards.shards["python"][0], prompt_parts(shards, job)
    assert ray.get(shard.score.remote("q", *question)).cached == 3
    before = ray.get(shard.take.remote("q", [0, 2], *question))
    ray.get(shard.score.remote("q2", *question))
    restart(shard)  # it dies between scoring a question and handing over its paths: it scores the question again
    after = ray.get(shard.take.remote("q2", [0, 2], *question))
    assert [s.tokens for s in after] == [s.tokens for s in before] and len(after) == 4
    assert all(torch.equal(a.kv, b.kv) and torch.equal(a.positions, b.positions) for a, b in zip(after, before))


def restart(shard) -> None:
    """Kill a shard actor and wait until its restarted self answers (`ray.kill` returns while the old one may still
    run a call)."""
    pid = ray.get(shard.__ray_call__.remote(lambda actor: os.getpid()))
    ray.kill(shard, no_restart=False)
    for _ in range(10_000):
        if ray.get(shard.__ray_call__.remote(lambda actor: os.getpid())) != pid:
            return
    raise AssertionError("the shard actor did not restart")


def prompt_parts(model: ModelServer, job: dict) -> tuple[list[int], list[int]]:
    prompt = model.prepare(job).forkjoin
    return prompt.preamble, prompt.query


@torch.inference_mode()
def test_rag_jobs_become_fork_join_requests_within_the_limits(tmp_path, tokenizer) -> None:
    checkpoint = rag_checkpoint(tmp_path, tokenizer)
    model = server(checkpoint, engine={"superposition": {"enabled": True, "hops": 2}},
                   limits={"max_prompt_tokens": 120, "max_output_tokens": 20})
    rag = {"documents": ["The if statement.", "A class."], "mode": None, "top_k": None}
    request = model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": rag})
    prompt = request.forkjoin
    assert model.engine.superposed(request) and request.prompt == "" and prompt.top_k is None
    assert model.engine.tokenizer.decode(prompt.flat()) == (
        "<s><user>" + "Use the documents below to answer the question. Answer with the exact value the documents "
        "give.\n\nThe if statement.\n\nA class.\n\nQuestion: hi\n<assistant>")
    # the context window must hold the worst pruning outcome besides the output
    assert request.params.max_new_tokens == min(20, 160 - model.engine.superposer.bound(prompt))
    naive = model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": {**rag, "mode": "naive", "top_k": 0}})
    assert not model.engine.superposed(naive) and naive.forkjoin.top_k == 0
    cases = [({**rag, "documents": ["The if statement."]}, "rag", None),  # hops=2 needs 2 documents
             ({**rag, "documents": ["statement " * 100]}, "rag.documents", "context_length_exceeded")]
    for bad, param, code in cases:
        with pytest.raises(RequestError) as e:
            model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": bad})
        assert e.value.args[1:3] == (param, code), e.value.args


def test_the_rag_instruction_comes_from_config(tmp_path, tokenizer) -> None:
    model = server(rag_checkpoint(tmp_path, tokenizer), rag_instruction="Answer with the 4-digit code.",
                   limits={"max_prompt_tokens": 120, "max_output_tokens": 20})
    rag = {"documents": ["The code is 1234."], "mode": None, "top_k": None}
    prompt = model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": rag}).forkjoin
    assert model.engine.tokenizer.decode(prompt.preamble) == "<s><user>Answer with the 4-digit code.\n\n"


@torch.inference_mode()
def test_document_stores_are_read_warmed_and_named_by_requests(tmp_path, tokenizer) -> None:
    checkpoint = rag_checkpoint(tmp_path, tokenizer)
    docs = ["The if statement.", "A class.", "The while loop."]
    (tmp_path / "python.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    settings = {"engine": {"superposition": {"enabled": True}},
                "limits": {"max_prompt_tokens": 120, "max_output_tokens": 20}}
    model = server(checkpoint, **settings, document_stores={"python": str(tmp_path / "python.jsonl")})
    assert model.engine.superposer.cache.stats()["entries"] == 1 + len(docs)  # the preamble and every document
    assert model.info()["document_stores"] == {"python": 3}
    rag = {"documents": None, "store": "python", "mode": None, "top_k": None}
    stored = model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": rag})
    sent = model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": {**rag, "documents": docs, "store": None}})
    assert stored.forkjoin.flat() == sent.forkjoin.flat()
    assert model.engine.generate([stored])[0].superposition.cached == len(docs)  # the first question is warm
    with pytest.raises(RequestError) as e:
        model.prepare({"messages": MESSAGES, "params": PARAMS, "rag": {**rag, "store": "java"}})
    assert e.value.args[1:3] == ("rag.store", "invalid_value") and "its stores: python" in e.value.args[0]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    (tmp_path / "long.txt").write_text("statement " * 100)
    (tmp_path / "empty.txt").write_text("\n\n")
    bad = {"bad": (r"bad\.jsonl:2: not valid JSON", {}),
           "empty": (r"models\.m\.document_stores\.empty: .*empty\.txt holds no documents", {}),
           "python": (r"models\.m\.document_stores\.python: .* holds 3 documents; a request takes at most "
                      r"limits\.max_documents=2", {"limits": {**settings["limits"], "max_documents": 2}}),
           "long": (r"models\.m\.document_stores\.long: .*beyond the model's context window of 160",
                    {"limits": {**settings["limits"], "max_prompt_tokens": 200}}),
           "many": (r"models\.m\.document_stores\.many: its documents make a prompt of \d+ tokens; "
                    r"limits\.max_prompt_tokens is 120", {})}
    for store, (message, override) in bad.items():
        path = tmp_path / {"bad": "bad.jsonl", "python": "python.jsonl", "empty": "empty.txt"}.get(store, "long.txt")
        with pytest.raises(RaytrainError, match=message):
            server(checkpoint, **{**settings, **override}, document_stores={store: str(path)})


@torch.inference_mode()
def test_prompts_that_cannot_fit_are_refused_before_tokenizing(checkpoints, monkeypatch) -> None:
    model = server(checkpoints["plain"])
    assert model.max_prompt_chars == 60 * longest_token_chars(model.engine.tokenizer)
    monkeypatch.setattr(model.engine.tokenizer, "encode", None)  # any tokenizing now fails
    monkeypatch.setattr(model.engine.tokenizer, "apply_chat_template", None)
    too_long = "x" * (model.max_prompt_chars + 1)
    for job, param in [({"prompt": too_long}, "prompt"),
                       ({"messages": [{"role": "user", "content": too_long}]}, "messages")]:
        with pytest.raises(RequestError) as e:
            model.prepare({"params": PARAMS, **job})
        assert e.value.args[1:3] == (param, "context_length_exceeded") and "characters" in e.value.args[0]
    vocab = model.engine.model.cfg.vocab_size
    assert model.prepare({"prompt": [0, vocab - 1], "params": PARAMS}).prompt == [0, vocab - 1]
    with pytest.raises(RequestError) as e:
        model.prepare({"prompt": [5, vocab], "params": PARAMS})
    assert e.value.args[1:3] == ("prompt", "invalid_value") and f"token id {vocab}" in e.value.args[0]


@torch.inference_mode()
@pytest.mark.parametrize("method", ["rtn", "palettize"])
def test_a_compressed_checkpoint_is_served_compressed_or_dense_with_the_same_output(checkpoints, tmp_path,
                                                                                   method) -> None:
    """Palettized checkpoints also hold the embedding as 8-bit integers (rebuilt on load either way)."""
    from raytrain.checkpoint.hf import embedding_weight_names, linear_weight_names, read_weights, save_compressed
    from raytrain.compress.format import compress_tensor
    from raytrain.compress.linear import CompressedLinear
    from raytrain.compress.palettize import PalettizeConfig
    from raytrain.compress.rtn import RTNConfig

    src = checkpoints["plain"]
    state = read_weights(src)
    config = RTNConfig(bits=4) if method == "rtn" else PalettizeConfig(bits=4)
    linear = linear_weight_names(src)
    compressed = {n: compress_tensor(state[n], method, config) for n in linear}
    if method == "palettize":
        compressed.update({n: compress_tensor(state[n], "rtn", RTNConfig(bits=8, group_size=32))
                           for n in embedding_weight_names(src)})
    out = save_compressed(tmp_path / method, src, {k: v for k, v in state.items() if k not in compressed},
                          compressed)
    kept, dense = server(out, weights="compressed"), server(out)
    assert sum(isinstance(m, CompressedLinear) for m in kept.engine.model.modules()) == len(linear)
    assert not any(isinstance(m, CompressedLinear) for m in dense.engine.model.modules())
    job = {"prompt": "The if", "params": {**PARAMS, "max_tokens": 6}}
    outputs = [s.engine.generate([s.prepare(job)])[0].token_ids for s in (kept, dense)]
    assert outputs[0] == outputs[1]
    with pytest.raises(RaytrainError, match="weights=compressed: .* holds no compressed weights"):
        server(src, weights="compressed")


def test_a_request_names_one_of_the_models_adapters_or_gets_a_404_naming_model(checkpoints, tmp_path) -> None:
    from tests.serving.conftest import random_adapter

    adapter = random_adapter(checkpoints["plain"], tmp_path / "a", 0, 2)
    served = server(checkpoints["plain"], adapters={"a": str(adapter)}, adapter_slots=1)
    assert served.prepare({"prompt": "x", "params": PARAMS, "adapter": "a"}).adapter == "a"
    assert served.prepare({"prompt": "x", "params": PARAMS}).adapter is None
    with pytest.raises(RequestError) as missing:
        served.prepare({"prompt": "x", "params": PARAMS, "adapter": "b"})
    assert missing.value.args[1:] == ("model", "model_not_found", 404) and "m:b does not exist" in missing.value.args[0]


def test_a_specstream_model_serves_its_greedy_output_in_fewer_steps(tmp_path, tokenizer) -> None:
    from raytrain.models.streams import StreamConfig

    cfg = DecoderConfig(name="ss", vocab_size=512, d_model=32, n_layers=2, head_dim=16, q_heads=2, kv_heads=2,
                        ffn_dim=64, max_seq_len=64, streams=StreamConfig(gamma=3, msa_layers=1))
    torch.manual_seed(0)
    checkpoint = save_pretrained(tmp_path / "ss", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    spec, plain = server(checkpoint, engine={"specstream": {"top_k": 2}}), server(checkpoint)
    assert spec.info()["decoding"] == "specstream" and plain.info()["decoding"] == "plain"
    job = {"messages": MESSAGES, "params": {**PARAMS, "max_tokens": 12}}
    outputs = [s.engine.generate([s.prepare(job)])[0].token_ids for s in (spec, plain)]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 12
    stats = spec.stats()["specstream"]
    assert stats["tokens"] == 12 and stats["forwards"] < 12 and "specstream" not in plain.stats()
