"""The compressed file and checkpoint: save -> load -> reconstruct round trips (dense and kept compressed), the
loaders of `raytrain.checkpoint.hf`, and the errors of truncated or mismatched files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from raytrain.checkpoint.hf import (CheckpointError, linear_weight_names, load_pretrained, model_state, read_weights,
                                    save_compressed, save_pretrained)
from raytrain.compress import format as cf
from raytrain.compress.format import CompressedTensor, FormatError, compress_tensor
from raytrain.compress.rtn import RTNConfig
from raytrain.compress.seedlm import SeedLMConfig
from raytrain.data.tokenizer import to_files
from raytrain.infer.engine import Engine, Request
from raytrain.infer.sampling import SamplingParams
from raytrain.models.decoder import build_decoder

K8 = {"K": 8, "taps": [0, 2, 3, 4]}


def compress_checkpoint_here(src: Path, out: Path, method: str, config) -> dict[str, CompressedTensor]:
    """What the Ray job writes, done in-process (the job itself is tested in tests/integration)."""
    state = read_weights(src)
    compressed = {n: compress_tensor(state[n], method, config) for n in linear_weight_names(src)}
    save_compressed(out, src, {k: v for k, v in state.items() if k not in compressed}, compressed, {"bits": 4})
    return compressed


@pytest.fixture
def model(micro_cfg) -> torch.nn.Module:
    """The micro decoder with the vocabulary of the `tokenizer` fixture, so that it can generate text."""
    torch.manual_seed(0)
    return build_decoder(dataclasses.replace(micro_cfg, vocab_size=512)).eval()


@pytest.fixture
def source(model, tokenizer, tmp_path) -> Path:
    return save_pretrained(tmp_path / "src", model.cfg, model_state(model), to_files(tokenizer))


def test_file_round_trip_records_config_shape_and_padding(tmp_path) -> None:
    weight = torch.randn(6, 21, dtype=torch.bfloat16)
    seed = compress_tensor(weight, "seedlm", SeedLMConfig.for_bits(3, **K8))
    rtn = compress_tensor(weight, "rtn", RTNConfig(bits=3, group_size=8))
    cf.save_file(tmp_path / "w.safetensors", {"norm": torch.ones(3)}, {"a.weight": seed, "b.weight": rtn})
    dense, compressed = cf.load_file(tmp_path / "w.safetensors")
    assert list(dense) == ["norm"] and sorted(compressed) == ["a.weight", "b.weight"]
    assert compressed["a.weight"].meta() == seed.meta() and seed.meta()["padding"] == 6 * 3  # 21 -> 2 blocks of 12
    assert seed.meta()["config"] == {"C": 12, "P": 4, "K": 8, "taps": [0, 2, 3, 4], "exponent_rule": "range75",
                                     "rounding": "half_even", "seed_convention": "lfsr_state", "blocking": "row"}
    for name, ct in (("a.weight", seed), ("b.weight", rtn)):
        back = compressed[name].dense()
        assert back.dtype == torch.bfloat16 and back.shape == (6, 21) and torch.equal(back, ct.dense())
    assert cf.dense_state(tmp_path / "w.safetensors").keys() == {"norm", "a.weight", "b.weight"}
    flat = compress_tensor(weight, "seedlm", SeedLMConfig.for_bits(3, blocking="flat", **K8))  # 126 -> 11 blocks
    cf.save_file(tmp_path / "f.safetensors", {}, {"f.weight": flat})
    back = cf.load_file(tmp_path / "f.safetensors")[1]["f.weight"]
    assert back.meta()["padding"] == 6 and back.config.blocking == "flat" and torch.equal(back.dense(), flat.dense())


def test_compressed_checkpoint_loads_dense_and_compressed_and_generates(source, model, tmp_path) -> None:
    out = tmp_path / "out"
    compressed = compress_checkpoint_here(source, out, "seedlm", SeedLMConfig.for_bits(4, **K8))
    assert sorted(compressed) == sorted(f"layers.{i}.{m}.weight" for i in range(2)
                                        for m in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"))
    assert json.loads((out / "config.json").read_text())["raytrain_compression"]["method"] == "seedlm"
    dense = load_pretrained(out)
    kept = load_pretrained(out, keep_compressed=True)
    assert type(kept.model.layers[1].ffn.proj_1).__name__ == "CompressedLinear"
    reference = model
    with torch.no_grad():
        for name, ct in compressed.items():
            reference.get_parameter(name).copy_(ct.dense())
        tokens = torch.randint(0, 512, (2, 7))
        torch.testing.assert_close(dense.model(tokens), reference(tokens))
        torch.testing.assert_close(kept.model(tokens), reference(tokens))
    request = Request("The if", SamplingParams(max_new_tokens=5, temperature=0))
    text = Engine(dense.model, dense.tokenizer).generate([request])[0].text
    assert text == Engine(kept.model, kept.tokenizer).generate([request])[0].text


def test_truncated_file_is_named(source, tmp_path) -> None:
    out = tmp_path / "out"
    compress_checkpoint_here(source, out, "rtn", RTNConfig())
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_pretrained(out)


def mismatched(tmp_path: Path, edit) -> Path:
    ct = compress_tensor(torch.randn(4, 16), "seedlm", SeedLMConfig.for_bits(4, **K8))
    edit(ct)
    cf.save_file(tmp_path / "bad.safetensors", {}, {"w": ct})
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda ct: ct.arrays.update(seeds=ct.arrays["seeds"][:-1]), r"w\.seeds holds 7 values, its record .* needs 8"),
    (lambda ct: ct.arrays.pop("coefficients"), r"array w\.coefficients is missing"),
    (lambda ct: ct.arrays["seeds"].zero_(), r"seeds outside 1\.\.255"),
    (lambda ct: setattr(ct, "shape", (4, 32)), r"w\.seeds holds 8 values"),
    (lambda ct: setattr(ct, "meta", lambda: {**type(ct).meta(ct), "method": "gptq"}), r"unreadable record"),
])
def test_mismatched_files_are_named(tmp_path, edit, message) -> None:
    with pytest.raises(FormatError, match=f"compressed tensor w: .*{message}"):
        cf.load_file(mismatched(tmp_path, edit))


def test_a_compressed_tensor_of_another_shape_than_the_model_is_named(source, tmp_path) -> None:
    out = tmp_path / "out"
    compress_checkpoint_here(source, out, "rtn", RTNConfig())
    config = json.loads((out / "config.json").read_text())
    config["ffn_dim"], config["layer_scaling"], config["q_heads"], config["kv_heads"] = 64, None, 2, 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.proj_1\.weight is \(64, 64\) in the checkpoint"):
        load_pretrained(out, keep_compressed=True)


def test_an_uncompressed_file_is_not_taken_for_a_compressed_one(source) -> None:
    assert not cf.is_compressed_file(source / "model.safetensors")
    with pytest.raises(FormatError, match="not a compressed checkpoint file"):
        cf.load_file(source / "model.safetensors")
