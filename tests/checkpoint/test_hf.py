"""Hugging Face layout checkpoints: round trip, the official OpenELM layout, and the errors of bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from raytrain.checkpoint.foreign import openelm_config
from raytrain.checkpoint.hf import CheckpointError, load_pretrained, model_state, save_pretrained
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import DecoderConfig, LayerScaling, build_decoder

OPENELM_270M = {  # the fields of apple/OpenELM-270M's config.json that describe the shapes
    "model_type": "openelm", "model_dim": 1280, "num_transformer_layers": 16, "head_dim": 64, "vocab_size": 32000,
    "num_query_heads": [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
    "num_kv_heads": [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5],
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
    "ffn_dim_divisor": 256, "normalize_qk_projections": True, "share_input_output_layers": True,
    "rope_freq_constant": 10000, "rope_max_length": 4096, "max_context_length": 2048,
}


def test_round_trip_preserves_logits_tokenizer_and_metadata(micro_model, tokenizer, tmp_path) -> None:
    out = save_pretrained(tmp_path / "ckpt", micro_model.cfg, model_state(micro_model), to_files(tokenizer),
                          {"step": 7})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "raytrain.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    loaded = load_pretrained(out)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), micro_model(tokens))
    assert loaded.config == micro_model.cfg and loaded.meta == {"step": 7}
    assert loaded.model.head.weight is loaded.model.embed.weight
    assert loaded.tokenizer.encode("The if statement") == tokenizer.encode("The if statement")


def test_loads_in_another_dtype(micro_model, tmp_path) -> None:
    out = save_pretrained(tmp_path / "ckpt", micro_model.cfg, model_state(micro_model))
    loaded = load_pretrained(out, dtype=torch.bfloat16)
    assert loaded.model.embed.weight.dtype == torch.bfloat16 and loaded.model.rope_cos.dtype == torch.float32
    assert loaded.tokenizer is None


def test_never_overwrites_a_checkpoint(micro_model, tmp_path) -> None:
    save_pretrained(tmp_path / "ckpt", micro_model.cfg, model_state(micro_model))
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_pretrained(tmp_path / "ckpt", micro_model.cfg, {k: v * 0 for k, v in model_state(micro_model).items()})
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_a_checkpoint_of_another_shape_is_named(micro_model, tmp_path) -> None:
    out = save_pretrained(tmp_path / "ckpt", micro_model.cfg, model_state(micro_model))
    config = json.loads((out / "config.json").read_text())
    config["ffn_dim"], config["layer_scaling"], config["q_heads"], config["kv_heads"] = 64, None, 2, 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.proj_1\.weight is \(64, 64\) in the checkpoint, \(128, 64\)"):
        load_pretrained(out)


def test_unreadable_inputs_are_named(micro_model, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    out = save_pretrained(tmp_path / "ckpt", micro_model.cfg, model_state(micro_model))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_pretrained(out)


def test_openelm_config_gives_the_reference_shapes() -> None:
    cfg = openelm_config(OPENELM_270M)
    assert [s.ffn_dim for s in cfg.layer_shapes()] == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328,
                                                       3584, 3840, 4352, 4608, 4864, 5120]
    assert cfg.layer_shapes() == DecoderConfig(d_model=1280, n_layers=16, head_dim=64,
                                               layer_scaling=LayerScaling()).layer_shapes()


def test_loads_the_official_openelm_layout(tmp_path) -> None:
    """A small checkpoint written with OpenELMForCausalLM parameter names and config fields loads and computes the
    same logits as the raytrain model whose weights it holds."""
    raw = {"model_type": "openelm", "model_dim": 64, "num_transformer_layers": 2, "head_dim": 16, "vocab_size": 97,
           "num_query_heads": [2, 4], "num_kv_heads": [1, 2], "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 32,
           "normalize_qk_projections": True, "share_input_output_layers": True, "rope_freq_constant": 10000,
           "rope_max_length": 128, "max_context_length": 64}
    torch.manual_seed(0)
    model = build_decoder(openelm_config(raw)).eval()
    renamed = {"transformer." + k.replace("embed.weight", "token_embeddings.weight"): v
               for k, v in model_state(model).items()}
    (tmp_path / "openelm").mkdir()
    save_file({k: v.contiguous() for k, v in renamed.items()}, tmp_path / "openelm" / "model.safetensors")
    (tmp_path / "openelm" / "config.json").write_text(json.dumps(raw))
    assert "transformer.layers.1.attn.qkv_proj.weight" in renamed
    loaded = load_pretrained(tmp_path / "openelm")
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens))


def test_a_run_directory_resolves_to_its_latest_registered_checkpoint(micro_model, tmp_path) -> None:
    for step in (5, 10):
        save_pretrained(tmp_path / "run" / f"step{step:09d}" / "model", micro_model.cfg, model_state(micro_model),
                        meta={"step": step})
    (tmp_path / "run" / "step000000015").mkdir()  # an upload that never completed is not registered
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "step000000010"}}
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert load_pretrained(tmp_path / "run").meta == {"step": 10}
    assert load_pretrained(tmp_path / "run" / "step000000005").meta == {"step": 5}
