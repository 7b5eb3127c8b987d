"""Each auto-labeling stage against cases with known answers (spec autolabel3d.md section 3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytrain.data.lidar import transform_points
from raytrain.data.lidar_scenes import Scene, SceneConfig
from raytrain.pipelines.autolabel import motion
from raytrain.pipelines.autolabel.boxes import fit_single, fit_track
from raytrain.pipelines.autolabel.cluster import Detection, cluster_points, clusters
from raytrain.pipelines.autolabel.config import (BoxConfig, ClusterConfig, GroundConfig, LabelConfig, MotionConfig,
                                                 ProjectionConfig, TrackConfig, VLMConfig)
from raytrain.pipelines.autolabel.geometry import iou_matrix
from raytrain.pipelines.autolabel.ground import remove_ground
from raytrain.pipelines.autolabel.label import Prompts, passes_gate, track_label
from raytrain.pipelines.autolabel.project import point_features, project, unproject, visible_in
from raytrain.pipelines.autolabel.track import KalmanTracker
from raytrain.pipelines.autolabel.vlm import LookPrototypes, feature_map


def box_surface(box: np.ndarray, n: int, rng: np.random.Generator, faces: tuple[int, ...] = (0, 1, 2, 3, 4)) -> np.ndarray:
    """Points on the faces of a box (0: +x, 1: -x, 2: +y, 3: -y, 4: top), in its parent frame."""
    x, y, z, l, w, h, yaw = box
    half = np.array([l, w, h]) / 2
    pts = rng.uniform(-1, 1, (n, 3)) * half
    face = rng.choice(faces, n)
    axis, sign = np.array([0, 0, 1, 1, 2])[face], np.array([1, -1, 1, -1, 1])[face]
    pts[np.arange(n), axis] = sign * half[axis]
    c, s = np.cos(yaw), np.sin(yaw)
    return pts @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + [x, y, z]


def test_ground_removal_on_a_known_plane() -> None:
    rng = np.random.default_rng(0)
    a, b, d = 0.03, -0.02, -1.8  # z = a x + b y + d, the sensor 1.8 m above the road
    xy = rng.uniform(-40, 40, (20000, 2))
    ground = np.column_stack([xy, a * xy[:, 0] + b * xy[:, 1] + d + rng.normal(0, 0.02, len(xy))])
    objects = []
    for cx, cy in rng.uniform(-30, 30, (12, 2)):
        floor = a * cx + b * cy + d
        objects.append(box_surface(np.array([cx, cy, floor + 0.8, 4.0, 1.8, 1.6, 0.3]), 300, rng))
    objects = np.concatenate(objects)
    mask, plane = remove_ground(np.concatenate([ground, objects]), GroundConfig())
    assert mask[:len(ground)].mean() >= 0.98
    above = a * objects[:, 0] + b * objects[:, 1] + d + 0.2 < objects[:, 2]
    assert mask[len(ground):][above].mean() <= 0.02
    normal = np.array([-a, -b, 1]) / np.linalg.norm([-a, -b, 1])
    assert np.degrees(np.arccos(plane[:3] @ normal)) < 1.0


def test_single_frame_box_fit_on_a_known_box() -> None:
    rng = np.random.default_rng(1)
    box = np.array([12.0, -3.0, 0.8, 4.5, 1.9, 1.6, 0.6])
    fit = fit_single(box_surface(box, 2000, rng), BoxConfig(margin_h=0.0))
    assert np.allclose(fit[:6], box[:6], atol=0.05)
    assert abs(np.mod(fit[6] - box[6], np.pi)) < 0.02 or abs(np.mod(fit[6] - box[6], np.pi) - np.pi) < 0.02
    assert iou_matrix(fit[None], box[None])[0, 0] > 0.95


def _tracked_detections(boxes: list[np.ndarray], yaws_seen: tuple[int, ...], rng: np.random.Generator,
                        moving: float) -> list[Detection]:
    return [Detection(f, box_surface(b, 400, rng, yaws_seen), b[2] - b[5] / 2, moving, None, 0)
            for f, b in enumerate(boxes)]


def _run_tracker(frames: list[list[Detection]], cfg: TrackConfig) -> KalmanTracker:
    tracker = KalmanTracker(cfg)
    for f, dets in enumerate(frames):
        tracker.step(f, 0.1 * f, dets)
    return tracker


def test_amodal_box_of_an_object_seen_only_from_behind() -> None:
    """Spec 3.4: a car seen only from behind (its rear face and top) gets l and w within 10% of the truth."""
    rng = np.random.default_rng(2)
    truth = [np.array([10.0 + 0.8 * f, 3.0, 0.8, 4.5, 1.9, 1.6, 0.0]) for f in range(12)]
    dets = _tracked_detections(truth, (1, 2, 4), rng, moving=1.0)  # rear, one side, top: never the front
    track = _run_tracker([[d] for d in dets], TrackConfig()).tracks()[0]
    fitted = fit_track(track, True, {f: np.zeros(2) for f in range(12)}, BoxConfig(margin_lw=0.0))
    assert fitted.moving
    for f, box in fitted.boxes.items():
        assert abs(box[3] - 4.5) / 4.5 < 0.1 and abs(box[4] - 1.9) / 1.9 < 0.1
        assert abs(np.mod(box[6] + np.pi / 2, np.pi) - np.pi / 2) < 0.05


def test_tracking_keeps_identities_on_a_clean_synthetic_sequence() -> None:
    """GT-clustered detections of the generator's objects: one track per object, no switches, a 2-frame gap bridged."""
    cfg = SceneConfig(frames=20, dropout=0.0, azimuth_step=0.4)
    scene = Scene(cfg, seed=4)
    frames, owner = [], []
    for f in range(cfg.frames):
        pose, world = scene.ego_pose(f * cfg.frame_dt), scene.boxes(f * cfg.frame_dt)
        points, ids = scene.lidar(pose, world)
        dets = []
        for k in np.unique(ids[ids > 0]):
            if (ids == k).sum() >= 30 and not (k == 2 and f in (8, 9)):  # object 2 is missed in frames 8 and 9
                dets.append(Detection(f, transform_points(pose, points[ids == k, :3]), 0.0, 0.0, None, 0))
                owner.append((f, int(k), dets[-1]))
        frames.append(dets)
    tracker = _run_tracker(frames, TrackConfig(min_len=3))
    tracker.tracks()
    ids_of: dict[int, set[int]] = {}
    for _, k, det in owner:
        ids_of.setdefault(k, set()).add(det.track_id)
    seen_long = {k for k in ids_of if sum(1 for _, kk, _ in owner if kk == k) >= 5}
    assert len(seen_long) >= 8
    assert all(len(ids_of[k]) == 1 for k in seen_long), ids_of  # no identity switch
    assert len({next(iter(ids_of[k])) for k in seen_long}) == len(seen_long)  # no two objects share a track
    assert 2 in seen_long


def test_motion_entropy_separates_moving_from_static_points() -> None:
    rng = np.random.default_rng(5)
    static_box, cfg = np.array([5.0, 5.0, 0.8, 4.0, 1.8, 1.6, 0.0]), MotionConfig()
    frames = []
    for f in range(15):
        moving_box = np.array([0.0 + 1.0 * f, 0.0, 0.8, 4.0, 1.8, 1.6, 0.0])  # 10 m/s
        frames.append(np.concatenate([box_surface(static_box, 600, rng), box_surface(moving_box, 600, rng)]))
    refs = [motion.MotionFrame.build(x, cfg) for x in frames]
    h = motion.entropy(refs[0], np.arange(1200), refs, cfg)
    assert np.median(h[:600]) > cfg.moving_entropy > np.median(h[600:])
    assert list(motion.window(18, 20, 15)) == list(range(5, 20)) and list(motion.window(2, 20, 15)) == list(range(2, 17))


def test_clustering_separates_objects() -> None:
    rng = np.random.default_rng(6)
    boxes = [np.array([x, y, 0.8, 4.0, 1.8, 1.6, 0.2]) for x, y in [(10, 0), (10, 4), (25, -6), (30, 8)]]
    pts = np.concatenate([box_surface(b, 300, rng) for b in boxes])
    truth = np.repeat(np.arange(4), 300)
    found = clusters(cluster_points(pts, ClusterConfig()))
    assert len(found) == 4
    assert all(len(np.unique(truth[c])) == 1 for c in found)


def test_projection_round_trip_and_occlusion() -> None:
    scene = Scene(SceneConfig(image_size=(160, 96)), seed=0)
    cam = scene.cameras()[0]
    rng = np.random.default_rng(7)
    xyz = np.column_stack([rng.uniform(5, 40, 500), rng.uniform(-5, 5, 500), rng.uniform(-1, 2, 500)])
    uv, z = project(cam, xyz)
    assert np.abs(unproject(cam, uv, z) - xyz).max() < 0.01
    wall = np.column_stack([np.full(4000, 10.0), rng.uniform(-3, 3, 4000), rng.uniform(-1, 3, 4000)])
    behind = np.array([[20.0, 0.0, 1.0], [20.0, 1.0, 0.0]])
    front = np.array([[10.0, 0.5, 0.5]])
    visible, _ = visible_in(cam, np.concatenate([wall, behind, front]), ProjectionConfig())
    assert not visible[-3:-1].any() and visible[-1] and visible[:4000].mean() > 0.9


def test_dense_feature_map_equals_per_crop_encoding() -> None:
    model, cfg = LookPrototypes(), VLMConfig(crop=8, stride=4)
    image = (np.random.default_rng(8).random((20, 28, 3)) * 255).astype(np.uint8)

    class CropsOnly:
        dim = model.dim
        encode_images = model.encode_images

    dense, crops = feature_map(model, image, cfg), feature_map(CropsOnly(), image, cfg)
    assert dense.shape == (5, 7, model.dim)
    np.testing.assert_allclose(dense, crops, atol=1e-5)


def test_fallback_vlm_labels_each_class_look_and_gates_background() -> None:
    """On generator images, projected object points get their class; trees and poles fail the static gate."""
    scene = Scene(SceneConfig(), seed=0)
    cams = scene.cameras()
    frame = scene.frame(0, cams)
    model, vcfg, lcfg = LookPrototypes(), VLMConfig(), LabelConfig()
    prompts = Prompts.encode(model, lcfg)
    maps = {n: feature_map(model, img, vcfg) for n, img in frame.images.items()}
    ids = frame.gt.point_ids
    query = np.flatnonzero(ids > 0)
    feats, vis = point_features(frame.points[:, :3].astype(np.float64), query, cams, maps, vcfg.stride,
                                ProjectionConfig())
    checked = 0
    for k, cls in zip(frame.gt.track_ids, frame.gt.classes):
        mine = (ids[query] == k) & vis
        if mine.sum() < 30:
            continue
        checked += 1
        mean = feats[mine].sum(0)
        mean /= np.linalg.norm(mean)
        label, _ = track_label(mean, prompts, lcfg)
        if cls in lcfg.prompts:
            assert label == cls
        else:
            assert label is None and not passes_gate(mean, prompts, lcfg)
    assert checked >= 6
    assert track_label(None, prompts, lcfg)[0] == "unknown" and passes_gate(None, prompts, lcfg)


def test_unknown_prompts_match_nothing() -> None:
    model = LookPrototypes()
    known = model.encode_text(["car", "tree"])
    novel = model.encode_text(["bulldozer", "stop sign"])
    assert torch.allclose(novel.norm(dim=1), torch.ones(2)) and (novel @ known.T).abs().max() < 0.5
    assert torch.allclose(model.encode_text(["a photo of a car"]), known[:1])


@pytest.mark.parametrize("mode", ["3d", "bev"])
def test_iou_of_known_overlaps(mode: str) -> None:
    a = np.array([[0.0, 0, 0, 4, 2, 2, 0]])
    shifted = np.array([[2.0, 0, 0, 4, 2, 2, 0]])  # half the box: 1/3
    rotated = np.array([[0.0, 0, 0, 4, 2, 2, np.pi / 2]])  # a 2x2 square in common: 4 / 12
    assert iou_matrix(a, a, mode)[0, 0] == pytest.approx(1.0)
    assert iou_matrix(a, shifted, mode)[0, 0] == pytest.approx(1 / 3)
    assert iou_matrix(a, rotated, mode)[0, 0] == pytest.approx(1 / 3)
    lifted = np.array([[0.0, 0, 1, 4, 2, 2, 0]])  # half the height in common
    assert iou_matrix(a, lifted, mode)[0, 0] == pytest.approx(1 / 3 if mode == "3d" else 1.0)
