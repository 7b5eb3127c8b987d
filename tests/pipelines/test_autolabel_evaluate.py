"""Average precision against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from raytrain.pipelines.autolabel.evaluate import EvalConfig, FrameEval, average_precision, report, subset_ap

CAR = np.array([10.0, 0, 0.8, 4, 2, 1.6, 0])


def frame(preds: list[tuple[np.ndarray, float, str]], gts: list[tuple[np.ndarray, str, float, int]]) -> FrameEval:
    return FrameEval(np.array([p[0] for p in preds]).reshape(-1, 7), np.array([p[1] for p in preds]),
                     [p[2] for p in preds], np.array([g[0] for g in gts]).reshape(-1, 7),
                     np.array([g[1] for g in gts]), np.array([g[2] for g in gts], np.float32),
                     np.array([g[3] for g in gts]))


def shifted(box: np.ndarray, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    out = box.copy()
    out[0] += dx
    out[1] += dy
    return out


def test_average_precision_by_hand() -> None:
    # ranked TP, FP, TP with 3 ground truths: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3
    # envelope: 1 on (0, 1/3], 2/3 on (1/3, 2/3], nothing beyond -> AP = 1/3 + 2/9
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), 3) == pytest.approx(1 / 3 + 2 / 9)
    assert average_precision(np.array([0.9, 0.8]), np.array([0, 1]), 1) == pytest.approx(0.5)
    assert average_precision(np.zeros(0), np.zeros(0), 2) == 0.0
    assert np.isnan(average_precision(np.zeros(0), np.zeros(0), 0))


def test_perfect_boxes_give_ap_one_and_a_half_overlap_counts_only_at_low_iou() -> None:
    cfg = EvalConfig(iou=[0.3, 0.5, 0.7])
    perfect = [frame([(CAR, 0.9, "car")], [(CAR, "car", 0.0, 100)])]
    assert subset_ap(perfect, cfg, 0.7, "3d") == 1.0
    half = [frame([(shifted(CAR, dx=2.0), 0.9, "car")], [(CAR, "car", 0.0, 100)])]  # IoU 1/3
    assert subset_ap(half, cfg, 0.3, "3d") == 1.0
    assert subset_ap(half, cfg, 0.5, "3d") == 0.0


def test_pooled_ranking_duplicates_and_background() -> None:
    """Two frames: a duplicate is a false positive, a box on a tree is a false positive, a missed car lowers recall."""
    cfg = EvalConfig()
    other = shifted(CAR, dy=6.0)
    f1 = frame([(CAR, 0.9, "car"), (CAR, 0.6, "car")], [(CAR, "car", 0.0, 100), (other, "car", 0.0, 100)])
    tree = np.array([20.0, 8, 2.5, 1.6, 1.6, 5, 0])
    f2 = frame([(tree, 0.8, "unknown"), (CAR, 0.7, "car")], [(CAR, "car", 5.0, 100), (tree, "tree", 0.0, 100)])
    # ranked: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP with 3 GT -> P 1, .5, .67, .5 at R 1/3, 1/3, 2/3, 2/3
    assert subset_ap([f1, f2], cfg, 0.7, "3d") == pytest.approx(1 / 3 + 2 / 9)
    # per class: the "unknown" box is not a car prediction -> 0.9 TP, 0.7 TP, 0.6 FP -> AP 2/3
    assert subset_ap([f1, f2], cfg, 0.7, "3d", cls="car") == pytest.approx(2 / 3)
    # moving subset: only the car of f2 (5 m/s) is ground truth; the static cars are ignored, not missed
    assert subset_ap([f1, f2], cfg, 0.7, "3d", motion="moving") == pytest.approx(0.5)


def test_sparse_and_out_of_range_ground_truth_is_ignored() -> None:
    cfg = EvalConfig(min_points=5)
    far = shifted(CAR, dx=60.0)  # beyond x_range
    f = frame([(CAR, 0.9, "car"), (far, 0.8, "car")], [(CAR, "car", 0.0, 3), (far, "car", 0.0, 100)])
    assert np.isnan(subset_ap([f], cfg, 0.5, "3d"))  # nothing left to find, nothing counted against
    g = frame([(CAR, 0.9, "car")], [(CAR, "car", 0.0, 3), (shifted(CAR, dy=5), "car", 0.0, 50)])
    assert subset_ap([g], cfg, 0.5, "3d") == 0.0  # the prediction on the sparse car is dropped, the other missed


def test_report_layout() -> None:
    r = report([frame([(CAR, 0.9, "car")], [(CAR, "car", 0.0, 100)])], EvalConfig())
    assert r["class_agnostic"] == {"3d@0.5": 1.0, "bev@0.5": 1.0, "3d@0.7": 1.0, "bev@0.7": 1.0}
    assert r["per_class"]["car"]["3d@0.7"] == 1.0 and r["per_class"]["truck"]["3d@0.7"] is None
    assert r["moving"]["3d@0.5"] is None and r["static"]["bev@0.5"] == 1.0
