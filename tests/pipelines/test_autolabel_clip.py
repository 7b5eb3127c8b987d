"""The CLIP image-text backend of auto-labeling and its training pairs: the generator's camera crops as shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.data.imagetext import resolve_files, tar_samples
from raytrain.data.lidar_scenes import PARTICIPANTS, SceneConfig, write_scenes
from raytrain.data.tokenizer import caption_tokens, to_files, train_bpe
from raytrain.models.registry import build_model, model_config
from raytrain.models.vit import ViTConfig, build_vit
from raytrain.pipelines.autolabel.config import LabelConfig, VLMConfig
from raytrain.pipelines.autolabel.crops import CropConfig, write_crop_shards
from raytrain.pipelines.autolabel.label import Prompts
from raytrain.pipelines.autolabel.vlm import build_vlm, feature_map

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, 1, SceneConfig(frames=4, azimuth_step=0.4), seed=3)
    return root


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """A tiny CLIP with random weights and a BPE, saved as `raytrain train job=clip` saves its checkpoints."""
    torch.manual_seed(0)
    cfg = model_config(OmegaConf.to_container(OmegaConf.load(CONF / "clip_tiny.yaml")))
    model = build_model(cfg).eval()
    tok = train_bpe(["car truck pedestrian cyclist road tree pole sky building vegetation"] * 20, 300)
    path = tmp_path_factory.mktemp("clip") / "model"
    save_pretrained(path, cfg, model_state(model), tokenizer_files=to_files(tok))
    return path, model, tok


def test_crop_shards_are_image_text_samples_of_the_objects_classes(scenes, tmp_path) -> None:
    counts = write_crop_shards(scenes, tmp_path, CropConfig(crop=16, frame_step=1))
    files, fmt = resolve_files(str(tmp_path), "auto")
    assert fmt == "webdataset" and len(files) == counts["shards"] == 1
    with open(files[0], "rb") as f:
        samples = list(tar_samples(f, files[0]))
    assert len(samples) == counts["samples"] > 0
    captions = {s["caption"] for s in samples}
    assert "road" in captions and captions & set(PARTICIPANTS)
    assert captions <= set(PARTICIPANTS) | {"road", "tree", "pole"}
    assert Image.open(io.BytesIO(samples[0]["image"])).size == (16, 16)
    assert not list(tmp_path.glob("*.tmp"))


def test_clip_backend_embeds_crops_and_prompts_with_the_checkpoint(clip_checkpoint) -> None:
    path, model, tok = clip_checkpoint
    vlm = build_vlm(VLMConfig(backend="clip", checkpoint=str(path), crop=16, stride=8))
    assert vlm.dim == model.cfg.embed_dim
    crops = torch.rand(3, 3, 16, 16)
    size = model.cfg.image.image_size
    with torch.no_grad():
        expected = model.encode_image(F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False))
    assert torch.allclose(vlm.encode_images(crops), expected, atol=1e-5)
    tokens, lengths = caption_tokens(tok, ["car", "a tree"], model.cfg.text.max_seq_len)
    assert tokens[0, 0] == tok.bos_token_id and tokens[0, lengths[0] - 1] == tok.eos_token_id
    with torch.no_grad():
        text = model.encode_text(torch.from_numpy(tokens), torch.from_numpy(lengths))
    assert torch.allclose(vlm.encode_text(["car", "a tree"]), text, atol=1e-5)
    assert not torch.allclose(text[0], text[1])
    prompts = Prompts.encode(vlm, LabelConfig())
    assert prompts.embeddings.shape == (10, vlm.dim)
    fmap = feature_map(vlm, np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8),
                       VLMConfig(backend="clip", crop=16, stride=8))
    assert fmap.shape == (3, 5, vlm.dim) and np.allclose(np.linalg.norm(fmap, axis=-1), 1, atol=1e-4)


def test_clip_backend_refuses_a_missing_or_wrong_checkpoint(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs vlm.checkpoint=DIR"):
        build_vlm(VLMConfig(backend="clip"))
    vit = ViTConfig(name="vit_micro", d_model=32, n_layers=1, n_heads=2, ffn_dim=64, num_classes=3, image_size=32,
                    pos_grid=2)
    save_pretrained(tmp_path / "vit", vit, model_state(build_vit(vit)))
    with pytest.raises(ValueError, match="a ViT, not a CLIP model"):
        build_vlm(VLMConfig(backend="clip", checkpoint=str(tmp_path / "vit")))
