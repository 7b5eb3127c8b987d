"""The procedural world: deterministic records, a renderer that draws records it did not generate, captions that
name what is drawn, and record validation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from raytrain.data import shapes
from raytrain.data.shapes import Scene, SceneError, WorldConfig


def test_records_are_deterministic_per_index() -> None:
    cfg = WorldConfig()
    a, b, c = shapes.sample(7, 0, cfg), shapes.sample(7, 0, cfg), shapes.sample(8, 0, cfg)
    assert a == b and a["scene"] != c["scene"]
    assert Image.open(io.BytesIO(a["image"])).size == (64, 64)


def test_renderer_draws_a_hand_written_record() -> None:
    record = {"background": "white", "objects": [
        {"shape": "square", "colour": "red", "size": "large", "x": 0.25, "y": 0.25},
        {"shape": "circle", "colour": "blue", "size": "small", "x": 0.75, "y": 0.75}]}
    pixels = np.asarray(shapes.render(Scene.from_dict(record), 64)).astype(int)
    assert np.abs(pixels[16, 16] - shapes.COLOURS["red"]).max() <= 2
    assert np.abs(pixels[48, 48] - shapes.COLOURS["blue"]).max() <= 2
    assert np.abs(pixels[16, 48] - shapes.BACKGROUNDS["white"]).max() <= 2  # top right is empty


def test_generated_scenes_have_consistent_relations_and_captions_name_the_objects() -> None:
    cfg = WorldConfig(min_objects=2, max_objects=3)
    for i in range(30):
        rng = shapes.sample_rng(0, i)
        scene = shapes.generate_scene(rng, cfg)
        for r in scene.relations:
            a, b = scene.objects[r.subject], scene.objects[r.object]
            assert {"left of": a.x <= b.x, "right of": a.x >= b.x, "above": a.y <= b.y, "below": a.y >= b.y}[
                r.predicate]
        caption = shapes.describe(scene, random.Random(i))
        assert any(o.shape in caption for o in scene.objects), caption
        assert Scene.from_dict(scene.to_dict()) == scene


@pytest.mark.parametrize("record, message", [
    ({"objects": [{"shape": "blob", "colour": "red", "size": "small", "x": 0.5, "y": 0.5}]}, r"objects\[0\].shape"),
    ({"objects": [{"shape": "star", "colour": "red", "size": "small", "x": 2, "y": 0.5}]}, r"objects\[0\]: x and y"),
    ({"objects": [{"shape": "star", "colour": "red", "x": 0.5, "y": 0.5}]}, r"objects\[0\]: missing .*size"),
    ({"objects": [], "background": "plaid"}, "background"),
    ({"shapes": []}, "objects"),
])
def test_bad_scene_records_name_the_field(record: dict, message: str) -> None:
    with pytest.raises(SceneError, match=message):
        Scene.from_dict(record)
