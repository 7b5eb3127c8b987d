"""task=vlm without Ray: Stage-1 freezing (fact 8), the starting VLM assembled from a tower checkpoint (CatLIP ViT
or CLIP) and a decoder checkpoint, and the errors that name a bad part."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.config import ConfigError
from raytrain.data.tokenizer import from_files, to_files
from raytrain.infer.vlm import collate
from raytrain.models.clip import ClipConfig, build_clip
from raytrain.models.decoder import build_decoder
from raytrain.models.vit import build_vit
from raytrain.train.tasks import VLMTaskConfig, assemble_vlm, set_trainable
from tests.models.test_vlm import DECODER, TOWER, ids, make


def test_stage_one_trains_the_projector_and_registers_only() -> None:
    """Fact 8: with the tower and the decoder frozen, registers and projector get nonzero gradients and nothing
    else gets one (the loss still flows back through the frozen decoder)."""
    model = make(drop=2).train()
    set_trainable(model, VLMTaskConfig(freeze=["image", "decoder"]).freeze)
    after = ids(6, 1)
    batch = collate([(ids(2, 0), after, [-100] * 6 + after[4:])], pad_id=0, left=False)
    batch.images = torch.rand(1, 3, 64, 64)
    model(batch).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    trained = {name for name, g in grads.items() if g is not None}
    assert trained == {n for n in grads if n.startswith(("projector.", "registers."))}
    assert all(grads[n].abs().sum() > 0 for n in trained)


def test_task_config_names_unknown_or_all_frozen_parts() -> None:
    with pytest.raises(ValueError, match="unknown part 'vision'"):
        VLMTaskConfig(freeze=["vision"])
    with pytest.raises(ValueError, match="every part is frozen"):
        VLMTaskConfig(freeze=["image", "projector", "registers", "decoder"])


@pytest.mark.parametrize("tower", ["vit", "clip"])
def test_assembled_vlm_holds_the_tower_and_decoder_weights(tmp_path, tokenizer, tower: str) -> None:
    torch.manual_seed(1)
    if tower == "vit":
        vit_cfg = dataclasses.replace(TOWER, name="catlip", num_classes=7)
        source = build_vit(vit_cfg)
        tower_path = save_pretrained(tmp_path / "tower", vit_cfg, model_state(source))
        expected_tower = {k: v for k, v in model_state(source).items() if not k.startswith("head.")}
    else:
        clip_cfg = ClipConfig(name="clip", image=TOWER, text=dataclasses.replace(DECODER, name="text"), embed_dim=8)
        source = build_clip(clip_cfg)
        tower_path = save_pretrained(tmp_path / "tower", clip_cfg, model_state(source))
        expected_tower = {k.removeprefix("image."): v for k, v in model_state(source).items()
                          if k.startswith("image.")}
    decoder = build_decoder(DECODER)
    decoder_path = save_pretrained(tmp_path / "decoder", DECODER, model_state(decoder), to_files(tokenizer))
    cfg = make().cfg
    task = VLMTaskConfig(image_tower=str(tower_path), decoder=str(decoder_path))
    out = assemble_vlm(cfg, task, to_files(tokenizer), tmp_path / "init", seed=0)
    vlm = load_pretrained(out).model
    for name, value in expected_tower.items():
        assert torch.equal(model_state(vlm.image)[name], value), name
    for name, value in model_state(decoder).items():
        assert torch.equal(model_state(vlm.decoder)[name], value), name
    assert assemble_vlm(cfg, task, to_files(tokenizer), tmp_path / "init", seed=0) == out  # reused, not rebuilt
    with pytest.raises(ConfigError, match="assembled from other parts"):
        assemble_vlm(cfg, VLMTaskConfig(decoder=str(decoder_path)), to_files(tokenizer), tmp_path / "init", 0)


def test_a_decoder_of_another_config_is_refused_by_name(tmp_path, tokenizer) -> None:
    other = dataclasses.replace(DECODER, rope_theta=5e5)  # same shapes: only the config can tell
    path = save_pretrained(tmp_path / "decoder", other, model_state(build_decoder(other)), to_files(tokenizer))
    with pytest.raises(ConfigError, match=r"task.decoder=.*rope_theta is 500000.0, model.decoder.rope_theta is "):
        assemble_vlm(make().cfg, VLMTaskConfig(decoder=str(path)), to_files(tokenizer), tmp_path / "init", 0)
    wide = dataclasses.replace(TOWER, d_model=48, n_heads=2)
    tower = save_pretrained(tmp_path / "tower", wide, model_state(build_vit(wide)))
    with pytest.raises(ConfigError, match="task.image_tower=.* does not fit this model"):
        assemble_vlm(make().cfg, VLMTaskConfig(image_tower=str(tower)), to_files(tokenizer),
                     tmp_path / "init2", 0)


def test_image_token_registers_start_as_the_loaded_decoders_embedding_of_the_word(tmp_path, tokenizer) -> None:
    """register_init=image_token: the assembled VLM's every register row is the embedding of "Image" in the decoder
    it was assembled from (not the random one it was built with); a word with no tokens is refused by its key."""
    decoder_cfg = dataclasses.replace(DECODER, vocab_size=len(tokenizer))
    torch.manual_seed(2)
    decoder = build_decoder(decoder_cfg)
    path = save_pretrained(tmp_path / "decoder", decoder_cfg, model_state(decoder), to_files(tokenizer))
    cfg = dataclasses.replace(make(registers=4, register_init="image_token").cfg, decoder=decoder_cfg)
    out = assemble_vlm(cfg, VLMTaskConfig(decoder=str(path)), to_files(tokenizer), tmp_path / "init", seed=0)
    word = from_files(to_files(tokenizer)).encode("Image", add_special_tokens=False)
    expected = decoder.embed.weight[word].mean(0).expand(4, -1)
    torch.testing.assert_close(load_pretrained(out).model.registers.weight, expected, rtol=0, atol=0)
    silent = dataclasses.replace(cfg, victor=dataclasses.replace(cfg.victor, register_init_word=""))
    with pytest.raises(ConfigError, match="model.victor.register_init_word='' gives no tokens"):
        assemble_vlm(silent, VLMTaskConfig(decoder=str(path)), to_files(tokenizer), tmp_path / "init2", seed=0)
