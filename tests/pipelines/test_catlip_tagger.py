"""The CatLIP tagger (`synth.tagger.kind=catlip`): which classes it keeps (top-k, threshold), how they join the region
tagger's tags (union after normalisation), its version, the decompose stage with it, and bad settings named. The
CatLIP checkpoint is a tiny random ViT whose head answers fixed scores, so the keeping rules are tested apart from
training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.config import ConfigError, RaytrainError
from raytrain.data import shapes
from raytrain.models.vit import ViTConfig, build_vit
from raytrain.pipelines.ctrlsynth import runner
from raytrain.pipelines.ctrlsynth.catlip_tagger import CatlipClassifier, CatlipTagger, kept, synset_noun, union
from raytrain.pipelines.ctrlsynth.config import SynthConfig
from raytrain.pipelines.ctrlsynth.tagger import CatlipTaggerConfig, TaggerConfig, build_tagger
from raytrain.pipelines.ctrlsynth.tags import Tags
from tests.conftest import compose

# synset name -> the score the stub classifier gives it on every image
SCORES = {"red.n.01": 0.95, "circle.n.01": 0.9, "picture.n.01": 0.8, "rhombus.n.01": 0.6, "square.n.01": 0.35,
          "star.n.01": 0.2}
CIRCLE = shapes.Scene([shapes.SceneObject("circle", "red", "large", 0.3, 0.5)], "white")


def write_catlip(path: Path, scores: dict[str, float] | None = None, vocab: bool = True) -> Path:
    """A CatLIP-layout checkpoint: a tiny ViT whose head has zero weights and biases logit(score), so every image
    gets `scores`, and its synsets.json (`vocab=False`: without it)."""
    scores = scores or SCORES
    cfg = ViTConfig(name="vit", d_model=32, n_layers=1, n_heads=2, ffn_dim=64, num_classes=len(scores),
                    image_size=64, pos_grid=4)
    torch.manual_seed(0)
    model = build_vit(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([math.log(p / (1 - p)) for p in scores.values()]))
    entries = [{"id": f"n{i:08d}", "name": name, "count": 1} for i, name in enumerate(scores)]
    files = {"synsets.json": json.dumps({"format": "raytrain-synset-vocab-1", "source": "test",
                                         "synsets": entries})} if vocab else None
    return save_pretrained(path, cfg, model_state(model), files)


def image_of(scene: shapes.Scene) -> np.ndarray:
    return np.asarray(shapes.render(scene, 64))


def classifier(path: Path, **settings) -> CatlipClassifier:
    return CatlipClassifier.load(CatlipTaggerConfig(checkpoint=str(path), **settings))


def test_kept_takes_the_top_k_then_the_threshold() -> None:
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.31, 0.3])
    assert kept(scores, 20, 0.3) == [1, 3, 2, 4, 5]  # best first, ties by index, >= threshold
    assert kept(scores, 2, 0.3) == [1, 3]
    assert kept(scores, 20, 0.5) == [1, 3, 2]
    assert kept(scores, 20, 0.95) == []


def test_classes_are_the_top_k_scoring_at_least_the_threshold(tmp_path) -> None:
    path, image = write_catlip(tmp_path / "catlip"), image_of(CIRCLE)
    found = classifier(path).classes(image)
    assert [n for n, _ in found] == ["red", "circle", "picture", "diamond", "square"]  # star: 0.2 < 0.3
    assert [round(s, 3) for _, s in found] == [0.95, 0.9, 0.8, 0.6, 0.35]
    assert [n for n, _ in classifier(path, top_k=2).classes(image)] == ["red", "circle"]
    assert [n for n, _ in classifier(path, threshold=0.7).classes(image)] == ["red", "circle", "picture"]
    # only the world's object nouns become objects: colours and alt-text words ("picture") do not
    assert classifier(path).objects(image) == ["circle", "diamond", "square"]
    assert classifier(path, top_k=2).objects(image) == ["circle"]


def test_synset_names_go_through_the_normalizer() -> None:
    assert synset_noun("hexagon.n.01") == "hexagon"
    assert synset_noun("rhombus.n.01") == "diamond"  # a synonym of the world's word
    assert synset_noun("Grey.n.01") == "gray"
    assert synset_noun("ice_cream.n.01") == "ice cream"


def test_union_adds_new_classes_as_bare_objects_and_keeps_found_ones() -> None:
    region = Tags(["circle", "circle", "square"], [(0, "red"), (1, "small"), (2, "blue")], [(0, "left of", 2)])
    merged = union(region, ["circle", "star", "diamond", "star"])
    assert merged.objects == ["circle", "circle", "square", "star", "diamond"]  # circle not duplicated, star once
    assert merged.attributes == region.attributes and merged.relations == region.relations
    assert merged.attrs_of(3) == [] and region.objects == ["circle", "circle", "square"]  # the input is unchanged


def test_the_merged_tagger_unites_region_tags_with_normalised_classes(tmp_path) -> None:
    cfg = TaggerConfig(kind="catlip", catlip=CatlipTaggerConfig(checkpoint=str(write_catlip(tmp_path / "c"))))
    tagger = build_tagger(cfg)
    assert isinstance(tagger, CatlipTagger)
    image = image_of(CIRCLE)
    region = tagger.region.tag_image(image)
    assert region.objects == ["circle"]
    tags = tagger.tag_image(image)
    assert tags.objects == ["circle", "diamond", "square"]  # rhombus.n.01 arrives as the world's "diamond"
    assert tags.attributes == region.attributes and tags.attrs_of(1) == []


def test_the_version_hashes_weights_vocabulary_and_settings(tmp_path) -> None:
    path = write_catlip(tmp_path / "a")
    base = classifier(path).version
    assert base.startswith("catlip-1:") and classifier(path).version == base
    assert classifier(path, threshold=0.5).version != base
    assert classifier(path, top_k=5).version != base
    assert classifier(write_catlip(tmp_path / "b", {**SCORES, "star.n.01": 0.7})).version != base  # weights


def test_decompose_stage_and_provenance_with_kind_catlip(tmp_path) -> None:
    catlip = CatlipTaggerConfig(checkpoint=str(write_catlip(tmp_path / "c")), threshold=0.5)
    cfg = SynthConfig(tagger=TaggerConfig(kind="catlip", catlip=catlip))
    version = runner.models_of(cfg)["tagger"]
    assert version == f"templates-1+{classifier(tmp_path / 'c', threshold=0.5).version}"
    out = runner.Decompose(cfg)({"key": ["a"], "image": [shapes.png_bytes(shapes.render(CIRCLE, 64))]})
    assert json.loads(out["state"][0])["tags"]["objects"] == ["circle", "diamond"]  # square: 0.35 < 0.5


def test_bad_catlip_settings_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="synth.tagger.catlip.checkpoint"):
        TaggerConfig(kind="catlip")
    for threshold in (1.5, -0.1):
        with pytest.raises(ValueError, match="synth.tagger.catlip.threshold"):
            CatlipTaggerConfig(checkpoint="x", threshold=threshold)
    with pytest.raises(ValueError, match="synth.tagger.catlip.top_k"):
        CatlipTaggerConfig(top_k=0)
    with pytest.raises(ValueError, match="synth.tagger.region=neural needs synth.tagger.checkpoint"):
        TaggerConfig(kind="catlip", region="neural", catlip=CatlipTaggerConfig(checkpoint="x"))
    with pytest.raises(RaytrainError, match="synth.tagger.catlip.checkpoint=/nonexistent: .*no such directory"):
        classifier(Path("/nonexistent"))
    with pytest.raises(RaytrainError, match="not a CatLIP run"):
        classifier(write_catlip(tmp_path / "novocab", vocab=False))


def test_the_synth_config_names_bad_catlip_keys() -> None:
    from raytrain.commands.synth import typed_config

    base = ["data.path=/pairs", "synth.llm.backend=template", "synth.tagger.kind=catlip"]
    with pytest.raises(ConfigError, match="synth.tagger.catlip.checkpoint"):
        typed_config(compose("synth", base))
    with pytest.raises(ConfigError, match="synth.tagger.catlip.threshold=2"):
        typed_config(compose("synth", [*base, "synth.tagger.catlip.checkpoint=/run",
                                       "synth.tagger.catlip.threshold=2"]))
    synth, _ = typed_config(compose("synth", [*base, "synth.tagger.catlip.checkpoint=/run"]))
    assert (synth.tagger.catlip.top_k, synth.tagger.catlip.threshold) == (20, 0.3)  # spec 3.2's defaults
