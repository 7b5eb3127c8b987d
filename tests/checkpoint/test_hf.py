"""Hugging Face layout checkpoints: round trip, the official OpenELM layout (every form of Apple's config, the keys
it cannot honour refused by name), and the errors of bad checkpoints."""

from __future__ import annotations

import json
import logging

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
    "rope_freq_constant": 10000, "rope_max_length": 4096, "max_context_length": 2048, "qkv_multipliers": [0.5, 1.0],
    "num_gqa_groups": 4, "activation_fn_name": "swish", "ffn_with_glu": True, "normalization_layer_name": "rms_norm",
    "architectures": ["OpenELMForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True,
}
MICRO_OPENELM = {"model_type": "openelm", "model_dim": 64, "num_transformer_layers": 2, "head_dim": 16,
                 "vocab_size": 97, "qkv_multipliers": [0.5, 1.0], "num_gqa_groups": 2, "ffn_multipliers": [0.5, 4.0],
                 "ffn_dim_divisor": 32, "normalize_qk_projections": True, "share_input_output_layers": True,
                 "rope_freq_constant": 10000, "rope_max_length": 128, "max_context_length": 64}


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
    assert (cfg.max_seq_len, cfg.rope_cache_len, cfg.qk_norm, cfg.tie_embeddings) == (2048, 4096, True, True)


def test_every_form_of_ffn_and_qkv_multipliers_that_apple_accepts() -> None:
    """A two-value ramp is Apple's own form (the released config.json stores its expansion), a single number
    gives every layer the same width; heads always come from qkv_multipliers and num_gqa_groups."""
    ramp = openelm_config({**OPENELM_270M, "ffn_multipliers": [0.5, 4.0]})
    assert ramp.layer_shapes() == openelm_config(OPENELM_270M).layer_shapes()
    uniform = openelm_config({**OPENELM_270M, "ffn_multipliers": 2, "qkv_multipliers": 0.75,
                              "num_query_heads": [16] * 16, "num_kv_heads": [4] * 16})
    assert {(s.q_heads, s.kv_heads, s.ffn_dim) for s in uniform.layer_shapes()} == {(16, 4, 2560)}


def write_openelm(path, raw: dict, state: dict) -> None:
    """A checkpoint directory in Apple's layout: OpenELMForCausalLM tensor names and its config.json."""
    names = {"embed.weight": "transformer.token_embeddings.weight", "head.weight": "lm_head.weight"}
    path.mkdir()
    save_file({names.get(k, "transformer." + k): v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(raw))


def test_loads_the_official_openelm_layout(tmp_path) -> None:
    """A small checkpoint written with OpenELMForCausalLM parameter names and config fields loads and computes the
    same logits as the raytrain model whose weights it holds."""
    torch.manual_seed(0)
    model = build_decoder(openelm_config(MICRO_OPENELM)).eval()
    assert [(s.q_heads, s.kv_heads) for s in model.cfg.layer_shapes()] == [(2, 1), (4, 2)]
    write_openelm(tmp_path / "openelm", MICRO_OPENELM, model_state(model))
    loaded = load_pretrained(tmp_path / "openelm")
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens))


def test_an_untied_checkpoint_uses_lm_head_and_ignores_apples_unused_classifier(tmp_path, caplog) -> None:
    """Missing normalize_qk_projections / share_input_output_layers take Apple's defaults (false): no QK norm, and
    the stored lm_head is the head; the classifier Apple's untied models carry is dropped with a log line."""
    raw = {k: v for k, v in MICRO_OPENELM.items() if k not in ("normalize_qk_projections",
                                                                 "share_input_output_layers")}
    torch.manual_seed(0)
    model = build_decoder(openelm_config(raw)).eval()
    assert not model.cfg.qk_norm and not model.cfg.tie_embeddings
    state = {**model_state(model), "classifier.weight": torch.randn(97, 64)}
    assert not torch.equal(state["head.weight"], state["embed.weight"])
    write_openelm(tmp_path / "untied", raw, state)
    with caplog.at_level(logging.INFO, logger="raytrain.checkpoint.foreign"):
        loaded = load_pretrained(tmp_path / "untied")
    assert "ignoring transformer.classifier.weight" in caplog.text
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens))
    assert torch.equal(loaded.model.head.weight, state["head.weight"])


def test_sequences_beyond_rope_max_length_run_as_in_the_reference(tmp_path) -> None:
    """Apple's RoPE table grows with the keys; its values do not depend on the table length, so a config whose
    rope_max_length is below the context computes what one with a long table computes."""
    torch.manual_seed(0)
    short = {**MICRO_OPENELM, "rope_max_length": 16}
    model = build_decoder(openelm_config({**MICRO_OPENELM, "rope_max_length": 256})).eval()
    write_openelm(tmp_path / "short", short, model_state(model))
    loaded = load_pretrained(tmp_path / "short").model
    tokens = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


@pytest.mark.parametrize("change, message", [
    ({"activation_fn_name": "gelu"}, "activation_fn_name='gelu': the decoder family computes SiLU"),
    ({"ffn_with_glu": False}, "ffn_with_glu=false"),
    ({"normalization_layer_name": "layer_norm"}, "normalization_layer_name='layer_norm'"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling: an OpenELM config key this loader does not honour"),
    ({"ffn_multipliers": [1.0, 2.0, 3.0]}, r"ffn_multipliers=\[1.0, 2.0, 3.0\]: expected a number, two numbers or 2"),
    ({"ffn_multipliers": "4"}, "ffn_multipliers='4'"),
    ({"qkv_multipliers": [0.5, 0.75, 1.0]}, r"qkv_multipliers=\[0.5, 0.75, 1.0\]: expected a number or two"),
    ({"num_transformer_layers": "2"}, "num_transformer_layers='2': must be a positive integer"),
    ({"num_gqa_groups": 0}, "num_gqa_groups=0"),
    ({"share_input_output_layers": "yes"}, "share_input_output_layers='yes': must be true or false"),
    ({"num_query_heads": [4, 4]}, r"num_query_heads=\[4, 4\]: Apple's OpenELMConfig derives \[2, 4\]"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False contradicts share_input_output_layers=True"),
])
def test_openelm_configs_the_loader_cannot_honour_are_refused_by_key(tmp_path, change: dict, message: str) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**MICRO_OPENELM, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / "bad")


def test_a_run_directory_resolves_to_its_latest_registered_checkpoint(micro_model, tmp_path) -> None:
    for step in (5, 10):
        save_pretrained(tmp_path / "run" / f"step{step:09d}" / "model", micro_model.cfg, model_state(micro_model),
                        meta={"step": step})
    (tmp_path / "run" / "step000000015").mkdir()  # an upload that never completed is not registered
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "step000000010"}}
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert load_pretrained(tmp_path / "run").meta == {"step": 10}
    assert load_pretrained(tmp_path / "run" / "step000000005").meta == {"step": 5}
