"""ViT presets against the spec's exact parameter counts, the token layout, resolution changes, CLIP shapes and
checkpoint round trips (with BatchNorm statistics)."""

from __future__ import annotations

import pytest
import torch

from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.models.clip import ClipConfig, build_clip
from raytrain.models.decoder import DecoderConfig
from raytrain.models.registry import build_model, model_config
from raytrain.models.vit import ViTConfig, build_vit
from tests.conftest import compose

COUNTS = {  # spec section 5.3, V = 24,320: stem, per block, trunk, head, total
    "vit_b16": (748_032, 7_087_872, 85_955_328, 18_702_080, 104_657_408),
    "vit_l16": (1_325_056, 12_596_224, 303_838_208, 24_928_000, 328_766_208),
    "vit_h16": (2_065_920, 19_677_440, 631_998_720, 31_153_920, 663_152_640),
}


@pytest.mark.parametrize("preset", COUNTS)
def test_presets_have_the_spec_parameter_counts(preset: str) -> None:
    model = build_model(model_config(compose("model_info", [f"model={preset}"]).model), "meta")
    c = model.param_counts()
    assert (c["params_stem"], c["params_per_block"], c["params_trunk"], c["params_head"], c["params_total"]) == \
        COUNTS[preset]


TINY = ViTConfig(name="t", d_model=32, n_layers=2, n_heads=2, ffn_dim=64, num_classes=5, image_size=32, pos_grid=2)


def test_forward_shapes_resolution_change_and_cls_position() -> None:
    torch.manual_seed(0)
    model = build_vit(TINY).eval()
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 5)
    assert model(torch.rand(2, 3, 64, 48)).shape == (2, 5)  # positional embedding resized to 4 x 3
    assert model.positions((4, 3)).shape == (1, 12, 32)
    images = torch.rand(2, 3, 32, 32)
    base = model.features(images)
    with torch.no_grad():
        model.pos_embed.add_(torch.randn_like(model.pos_embed))  # the CLS token carries no positional embedding, but attends to patches that do
    assert not torch.allclose(model.features(images), base)
    model.layers = torch.nn.ModuleList()  # no blocks: the output is the norm of the CLS token alone
    with torch.no_grad():
        assert torch.allclose(model.features(images), model.norm(model.cls_token[:, 0].expand(2, -1)))


def test_clip_features_are_unit_and_pooled_at_the_last_real_token() -> None:
    torch.manual_seed(0)
    text = DecoderConfig(name="tt", vocab_size=50, d_model=32, n_layers=1, head_dim=16, q_heads=2, kv_heads=2,
                         ffn_dim=64, max_seq_len=16, tie_embeddings=False)
    model = build_clip(ClipConfig(image=ViTConfig(**{**TINY.__dict__, "num_classes": 0}), text=text,
                                  embed_dim=8)).eval()
    tokens = torch.randint(0, 50, (2, 6))
    image, txt, scale = model(torch.rand(2, 3, 32, 32), tokens, torch.tensor([4, 6]))
    assert image.shape == txt.shape == (2, 8) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    padded = tokens.clone()
    padded[0, 4:] = 0  # whatever follows the last real token does not change its features
    assert torch.allclose(model.encode_text(padded, torch.tensor([4, 6])), txt, atol=1e-6)


def test_checkpoint_round_trip_keeps_batchnorm_statistics(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_vit(TINY).train()
    model(torch.rand(4, 3, 32, 32))  # updates the stem's running statistics
    save_pretrained(tmp_path / "m", TINY, {k: v.detach() for k, v in model_state(model).items()})
    loaded = load_pretrained(tmp_path / "m").model
    assert torch.equal(loaded.stem.norm1.running_mean, model.stem.norm1.running_mean)
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(images), model(images))
