"""The student's point head: distillation lowers the loss, and a text query then selects the right points."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from raytrain.data.lidar import Sequence
from raytrain.data.lidar_scenes import SceneConfig, write_scene
from raytrain.models.pillars import PillarNetConfig
from raytrain.pipelines.autolabel import distill
from raytrain.pipelines.autolabel.config import AutolabelConfig, LabelConfig
from raytrain.pipelines.autolabel.label import Prompts
from raytrain.pipelines.autolabel.runner import label_sequence
from raytrain.pipelines.autolabel.vlm import LookPrototypes
from raytrain.pipelines.common import config_hash
from raytrain.train.objectives import cosine_distillation


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[distill.PointFrame]:
    root = tmp_path_factory.mktemp("distill")
    seq = write_scene(root / "data" / "seq", SceneConfig(frames=5, azimuth_step=0.4), seed=2)
    for out in ("labels", "again"):
        result = label_sequence(str(seq), AutolabelConfig(), root / out, config_hash("test"))
        assert result.status == "done", result.reason
    for path in sorted((root / "labels" / "seq" / "labels").iterdir()):  # the same input gives the same labels
        assert path.read_text() == (root / "again" / "seq" / "labels" / path.name).read_text()
    return distill.load_frames(Sequence(seq), root / "labels")


def test_cosine_distillation_masks_points_without_a_target() -> None:
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert cosine_distillation(pred, target, torch.tensor([True, True, False])) == pytest.approx(0.5)
    assert cosine_distillation(pred, target, torch.tensor([False, False, False])) == 0.0


def test_distillation_loss_falls_and_a_text_query_selects_the_right_points(frames) -> None:
    torch.set_num_threads(2)
    cfg = distill.DistillConfig(steps=40, lr=5e-3, model=PillarNetConfig(width=16, point_dim=16, cell=0.8))
    model, losses = distill.train(frames, cfg)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    prompts = Prompts.encode(LookPrototypes(), LabelConfig())
    f = max(frames, key=lambda f: int((f.gt_class == "car").sum()))
    probs = distill.point_query(model, f, prompts, tau=0.01)
    chosen = probs.argmax(1) == prompts.names.index("car")
    cars = f.gt_class == "car"
    assert chosen.any() and (cars[chosen]).mean() > 0.6  # precision of the query "car" over non-ground points
    assert chosen[cars].mean() > 0.6  # and its recall of car points, cameras or not
