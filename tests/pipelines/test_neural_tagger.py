"""The neural tagger of the procedural world: its training samples from scene records, its reading of colour regions
(with an oracle network, so the reading is tested apart from training), its checkpoint and config, and the
pipeline's decompose stage with it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from raytrain.config import RaytrainError
from raytrain.data import shapes
from raytrain.pipelines.ctrlsynth import runner
from raytrain.pipelines.ctrlsynth.config import SynthConfig
from raytrain.pipelines.ctrlsynth.neural_tagger import (N_SHAPES, N_SIZES, NO_OBJECT, NeuralTagger, exact_reads,
                                                        region_samples, train_tagger)
from raytrain.pipelines.ctrlsynth.tagger import TaggerConfig

WORLD = shapes.WorldConfig()


def test_regions_are_labelled_with_the_record_object_they_cover() -> None:
    hexagon = shapes.SceneObject("hexagon", "red", "large", 0.3, 0.3)
    crescent = shapes.SceneObject("crescent", "blue", "large", 0.7, 0.65, 10.0)
    samples = region_samples(shapes.Scene([hexagon, crescent], "white"), 64, 12)
    labels = [(shapes.SHAPES[s], list(shapes.SIZES)[z]) if s != NO_OBJECT else None for _, s, z, _ in samples]
    assert labels == [("hexagon", "large"), ("crescent", "large"), None]  # the last: pink pixels at a red edge
    assert all(w.shape == (32, 32) and w.any() for w, _, _, _ in samples)
    assert np.abs(samples[0][3]).max() < 1.5 / 64  # a hexagon's region is centred on it
    assert np.abs(samples[1][3][0]) > 4 / 64  # a crescent's is not: the offset carries its centre


class Oracle(nn.Module):
    """A network that answers a scene's true region labels (in `colour_regions` order), whatever it is shown."""

    def __init__(self, scene: shapes.Scene) -> None:
        super().__init__()
        samples = region_samples(scene, 64, 12)
        self.outputs = (10 * nn.functional.one_hot(torch.tensor([s[1] for s in samples]), N_SHAPES + 1).float(),
                        10 * nn.functional.one_hot(torch.tensor([s[2] for s in samples]), N_SIZES).float(),
                        torch.from_numpy(np.stack([s[3] for s in samples])))

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.outputs


def test_reading_regions_with_true_labels_gives_the_scene_records_tags() -> None:
    scenes = [shapes.generate_scene(shapes.sample_rng(5, i), WORLD) for i in range(30)]
    exact = [exact_reads(NeuralTagger(Oracle(s)), [s], 64) for s in scenes]
    assert sum(exact) == 30  # the regions, colours and centres, not the network, decide a read here


def test_the_centre_comes_from_the_offset_not_the_regions_box() -> None:
    scene = shapes.Scene([shapes.SceneObject("crescent", "red", "large", 0.5, 0.5)], "white")
    (found,) = NeuralTagger(Oracle(scene)).detect(np.asarray(shapes.render(scene, 64)))
    assert found.shape == "crescent" and abs(found.x - 0.5) < 0.5 / 64 and abs(found.y - 0.5) < 0.5 / 64


def test_a_trained_checkpoint_loads_with_its_hash_and_tags_through_the_decompose_stage(tmp_path) -> None:
    meta = train_tagger(tmp_path, scenes=16, steps=3, batch=4, width=4, heldout=4)
    assert meta["steps"] == 3 and 0 <= meta["heldout_exact_read"] <= 1
    weights = (tmp_path / "tagger.safetensors").read_bytes()
    cfg = SynthConfig(tagger=TaggerConfig(kind="neural", checkpoint=str(tmp_path)))
    tagger = NeuralTagger.load(cfg.tagger)
    assert tagger.version == "neural-1:" + hashlib.sha256(weights).hexdigest()[:12]
    assert runner.models_of(cfg)["tagger"] == tagger.version
    image = shapes.png_bytes(shapes.render(shapes.generate_scene(shapes.sample_rng(1, 0), WORLD), 64))
    out = runner.Decompose(cfg)({"key": ["a"], "image": [image]})
    assert '"objects"' in out["state"][0]
    assert NeuralTagger.load(cfg.tagger).tag(image) == tagger.tag(image)


def test_bad_tagger_settings_are_named() -> None:
    with pytest.raises(ValueError, match="synth.tagger.checkpoint"):
        TaggerConfig(kind="neural")
    with pytest.raises(ValueError, match="synth.tagger.kind='cnn'"):
        TaggerConfig(kind="cnn")
    with pytest.raises(RaytrainError, match="no tagger.safetensors"):
        NeuralTagger.load(TaggerConfig(kind="neural", checkpoint="/nonexistent/tagger"))
