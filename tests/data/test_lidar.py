"""The LiDAR sequence format round-trips, bad frames are reported (not raised), and the generator is deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytrain.data.lidar import LidarFormatError, Sequence, find_sequences, pose_problem, transform_boxes, write_frame
from raytrain.data.lidar_scenes import Scene, SceneConfig, write_scene
from raytrain.pipelines.autolabel.geometry import points_in_box

SMALL = SceneConfig(frames=3, image_size=(64, 40), azimuth_step=0.8, beams=16)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    return Sequence(write_scene(tmp_path_factory.mktemp("lidar") / "seq_a", SMALL, seed=3))


def test_round_trip_and_ground_truth(sequence: Sequence) -> None:
    assert sequence.id == "seq_a" and sequence.num_frames == 3 and len(sequence.cameras) == 3
    frame = sequence.frame(1)
    assert frame.problems == [] and frame.usable
    assert frame.points.shape[1] == 4 and len(frame.points) > 1000
    assert set(frame.images) == {c.name for c in sequence.cameras}
    assert frame.images[sequence.cameras[0].name].shape == (40, 64, 3)
    gt = frame.gt
    assert len(gt.boxes) == len(gt.classes) == len(gt.track_ids) and len(gt.point_ids) == len(frame.points)
    hit = gt.num_points > 0
    assert hit.any() and set(np.unique(gt.point_ids)) <= {0, *gt.track_ids.tolist()}
    for k in np.flatnonzero(gt.num_points > 20):  # points hit by an object lie in (or on) its box
        grown = gt.boxes[k].copy()
        grown[3:6] += 0.1
        mine = frame.points[gt.point_ids == gt.track_ids[k], :3]
        assert points_in_box(mine, grown).mean() > 0.95


def test_generator_is_deterministic() -> None:
    a, b = Scene(SMALL, seed=7), Scene(SMALL, seed=7)
    fa, fb = a.frame(2, a.cameras()), b.frame(2, b.cameras())
    np.testing.assert_array_equal(fa.points, fb.points)
    np.testing.assert_array_equal(fa.gt.boxes, fb.gt.boxes)
    assert not np.array_equal(fa.points[:100], Scene(SMALL, seed=8).frame(2, a.cameras()).points[:100])


def test_moving_objects_move_in_the_world_and_static_ones_stay() -> None:
    scene = Scene(SMALL, seed=1)
    b0, b1 = scene.boxes(0.0), scene.boxes(1.0)
    speeds = np.array([o.speed for o in scene.objects])
    moved = np.linalg.norm(b1[:, :2] - b0[:, :2], axis=1)
    assert np.allclose(moved[speeds == 0], 0) and (moved[speeds > 0] > 0.9 * speeds[speeds > 0] * 0.9).all()
    vehicle = transform_boxes(np.linalg.inv(scene.ego_pose(1.0)), b1)  # the ego moved: static boxes shift back
    assert np.all(vehicle[speeds == 0, 0] < b1[speeds == 0, 0])


def test_bad_frames_are_reported_not_raised(sequence: Sequence, tmp_path) -> None:
    frame = sequence.frame(0)
    frame.points = np.zeros((0, 4), np.float32)
    frame.pose = np.full((4, 4), np.nan)
    del frame.images[sequence.cameras[1].name]
    write_frame(sequence.root, frame)
    bad = Sequence(sequence.root).frame(0)
    kinds = sorted(p.split(":")[0] for p in bad.problems)
    assert kinds == ["bad_pose", "missing_camera", "no_points"] and not bad.usable
    sequence.frame_path(2).write_bytes(b"not an npz")
    assert Sequence(sequence.root).frame(2).problems[0].startswith("unreadable")


def test_bad_metadata_names_the_file(tmp_path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "meta.json").write_text(json.dumps({"format": "raytrain.lidar_sequence", "id": "s"}))
    with pytest.raises(LidarFormatError, match=r"meta.json: missing or malformed field 'num_frames'"):
        Sequence(tmp_path / "s")
    with pytest.raises(LidarFormatError, match="no such directory"):
        find_sequences(tmp_path / "nothing")
    assert find_sequences(tmp_path) == [tmp_path / "s"]


def test_pose_checks() -> None:
    assert pose_problem(np.eye(4)) is None
    assert "shape" in pose_problem(np.eye(3))
    skew = np.eye(4)
    skew[0, 1] = 0.5
    assert pose_problem(skew) == "not a rigid transform"
