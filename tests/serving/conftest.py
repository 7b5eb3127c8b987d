"""A tiny model trained here, and one local Serve instance (on a free port) serving it twice, shared by the test
modules here: `default` (plain decoding, with two LoRA adapters `default:a` and `default:b` in two slots) and `lazy`
(LazyLLM, with tight queue and timeout limits for the overload and timeout tests). The API wants a key (read from a
file; requests send `AUTH`) and takes bodies of at most `MAX_BODY` bytes, received within 2 s."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from raytrain.checkpoint.adapter import base_fingerprint, save_adapter
from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.data.corpus import documents
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, LayerScaling, build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora, lora_layers
from raytrain.train.objectives import lm_loss
from serving.config import serve_config, serve_spec
from tests.conftest import compose, local_ray

API_KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 300_000
DOCUMENTS = ["The if statement selects exactly one of the suites by evaluating the expressions.",
             "A class definition defines a class object; its suite is executed in a new frame.",
             "The while statement is used for repeated execution as long as an expression is true."]
LAZY = ("+serve.models.lazy={checkpoint:${checkpoint},engine:{max_batch_size:2,lazy:true,"
        "lazyllm:{min_prompt_tokens:16}},limits:{request_timeout_s:1.5,max_output_tokens:2000},"
        "deployment:{max_ongoing_requests:2,max_queued_requests:2}}")


def train_tiny(tokenizer, out: Path, steps: int = 150) -> Path:
    """A few AdamW steps of a 4-layer decoder on the embedded corpus: enough for corpus-like, prompt-dependent text."""
    cfg = DecoderConfig(name="serve_test", vocab_size=512, d_model=64, n_layers=4, head_dim=16, max_seq_len=2048,
                        layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32))
    torch.manual_seed(0)
    model = build_decoder(cfg)
    ids = torch.tensor([t for d in documents()[:20] for t in tokenizer.encode(d)])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:], 0.0)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_pretrained(out, cfg, model_state(model), to_files(tokenizer))


def random_adapter(base: Path, out: Path, seed: int, rank: int) -> Path:
    """A LoRA adapter of `base` with random A and B (a trained one differs from the base the same way: B != 0)."""
    model = load_pretrained(base).model
    lora = LoRAConfig(rank=rank, alpha=2.0 * rank)
    apply_lora(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_(std=0.2)
            layer.lora_B.normal_(std=0.2)
    return save_adapter(out, adapter_state(model), lora, base, base_fingerprint(base))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Reference generations here run beside the replicas on a shared CPU, where a second torch thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def checkpoint(one_thread, tmp_path_factory, tokenizer) -> Path:
    return train_tiny(tokenizer, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="package")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Two adapters of the served model, of different ranks and weights."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": random_adapter(checkpoint, root / "a", 1, 2), "b": random_adapter(checkpoint, root / "b", 2, 4)}


@pytest.fixture(scope="package")
def server(checkpoint, adapters, tmp_path_factory):
    """The base URL of a Serve instance started from `conf/serve.yaml` the way `raytrain serve` starts it."""
    from ray import serve

    from serving.run import start

    local_ray()
    key_file = tmp_path_factory.mktemp("secret") / "api_key"
    key_file.write_text(API_KEY + "\n")
    store = key_file.parent / "python.txt"  # `default`'s document store: DOCUMENTS, blank-line separated
    store.write_text("\n\n".join(DOCUMENTS) + "\n")
    cfg = compose("serve", [f"checkpoint={checkpoint}", f"serve.http_options.port={free_port()}",
                            f"serve.api.api_key_file={key_file}", f"serve.api.max_body_bytes={MAX_BODY}",
                            "serve.api.body_timeout_s=2",
                            "generation.max_batch_size=4", "serve.models.default.deployment.max_ongoing_requests=8",
                            "serve.models.default.deployment.max_queued_requests=8",
                            "serve.models.default.deployment.autoscaling_config.max_replicas=1",
                            "serve.models.default.limits.max_output_tokens=2000",
                            "serve.models.default.stream_interval_s=0",  # an item per engine step
                            *(f"+serve.models.default.adapters.{name}={path}" for name, path in adapters.items()),
                            "serve.models.default.adapter_slots=2",
                            f"+serve.models.default.document_stores.python={store}", LAZY])
    url = start(serve_config(serve_spec(cfg.serve)), timeout_s=300)
    yield url
    serve.shutdown()
