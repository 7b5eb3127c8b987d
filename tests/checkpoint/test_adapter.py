"""Adapter checkpoints: only the adapter is written, it loads back onto its base (dense or palettized, kept
compressed) with the same outputs, a copy of the base is the same base, and another base is refused by name."""

from __future__ import annotations

import shutil

import pytest
import torch

from raytrain.checkpoint.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, base_fingerprint,
                                         read_adapter, save_adapter)
from raytrain.checkpoint.hf import (CheckpointError, linear_weight_names, load_pretrained, model_state, read_weights, save_compressed,
                                    save_pretrained)
from raytrain.compress.format import compress_tensor
from raytrain.compress.palettize import PalettizeConfig
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora, lora_layers
from tests.conftest import preset


def base_checkpoint(path, tokenizer, seed: int):
    torch.manual_seed(seed)
    cfg = preset("afm_micro")
    return save_pretrained(path, cfg, model_state(build_decoder(cfg)), to_files(tokenizer))


def palettized(src, out):
    state = read_weights(src)
    compressed = {n: compress_tensor(state[n], "palettize", PalettizeConfig(bits=2)) for n in linear_weight_names(src)}
    return save_compressed(out, src, {k: v for k, v in state.items() if k not in compressed}, compressed)


def trained_adapter(base_dir, out, lora: LoRAConfig) -> tuple[torch.nn.Module, object]:
    """The base with an adapter whose B is non-zero (as after training), saved to `out`."""
    model = load_pretrained(base_dir).model
    apply_lora(model, lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model, save_adapter(out, adapter_state(model), lora, base_dir, base_fingerprint(base_dir), {"step": 7})


@pytest.mark.parametrize("palettized_base", [False, True])
def test_an_adapter_holds_only_itself_and_reloads_onto_its_base(tokenizer, tmp_path, palettized_base) -> None:
    base = base_checkpoint(tmp_path / "dense", tokenizer, 0)
    if palettized_base:
        base = palettized(base, tmp_path / "pal")
    lora = LoRAConfig(rank=4, alpha=8)
    model, out = trained_adapter(base, tmp_path / "adapter", lora)
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    adapter = read_adapter(out)
    assert adapter.lora == lora and adapter.meta == {"step": 7} and all("lora_" in k for k in adapter.state)
    tokens = torch.randint(0, 512, (2, 8))
    loaded = load_pretrained(base, adapter=out).model
    torch.testing.assert_close(loaded(tokens), model(tokens))
    kept = load_pretrained(base, adapter=out, keep_compressed=True).model
    torch.testing.assert_close(kept(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    assert type(kept.layers[0].attn.qkv_proj.base).__name__ == ("CompressedLinear" if palettized_base else "Linear")


def test_an_adapter_is_refused_on_another_base_and_accepted_on_a_copy(tokenizer, tmp_path) -> None:
    base = base_checkpoint(tmp_path / "a", tokenizer, 0)
    _, out = trained_adapter(base, tmp_path / "adapter", LoRAConfig(rank=2))
    shutil.copytree(base, tmp_path / "copy")
    load_pretrained(tmp_path / "copy", adapter=out)  # the same weights elsewhere are the same base
    other = base_checkpoint(tmp_path / "b", tokenizer, 1)
    with pytest.raises(AdapterError, match=r"was trained on base .*/a \(fingerprint [0-9a-f]{16}\), not on .*/b "
                                           r"\(fingerprint [0-9a-f]{16}\): an adapter only fits the weights"):
        load_pretrained(other, adapter=out)
    with pytest.raises(AdapterError, match="was trained on base"):  # the palettized base is another base too
        load_pretrained(palettized(base, tmp_path / "pal"), adapter=out)


def test_missing_and_damaged_adapters_are_named(tokenizer, tmp_path) -> None:
    base = base_checkpoint(tmp_path / "a", tokenizer, 0)
    with pytest.raises(AdapterError, match="no adapter_config.json there"):
        load_pretrained(base, adapter=base)
    _, out = trained_adapter(base, tmp_path / "adapter", LoRAConfig(rank=2))
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter: load its base with the adapter \(checkpoint=.*/a "
                                              r"adapter=.*/adapter\)"):
        load_pretrained(out)
    (out / ADAPTER_WEIGHTS).write_bytes((out / ADAPTER_WEIGHTS).read_bytes()[:100])
    with pytest.raises(AdapterError, match="unreadable adapter.safetensors"):
        read_adapter(out)
