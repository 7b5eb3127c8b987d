"""3D and BEV average precision of auto labels against ground truth, class-agnostic, per class, moving and static.

Per frame, in the vehicle frame, inside the evaluation crop (box centres with x in `x_range`, y in `y_range`):
ground truth are the boxes of participant classes (`classes`) with at least `min_points` LiDAR points; participant
boxes with fewer points are ignored (a prediction on them is neither a true nor a false positive, like WOD's
difficulty levels); background objects (trees, poles) are not ground truth, so a box on one is a false positive.
Predictions are matched greedily by descending score to the unmatched ground truth of highest IoU at or above the
threshold. AP is the area under the precision envelope (all-point interpolation) of the score-ranked predictions of
all frames pooled. The moving (speed >= `moving_speed`) and static breakdowns count only that subset as ground
truth and ignore the other; per-class AP takes the predictions labelled with the class and its ground truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raytrain.data.lidar import LidarFormatError, Sequence
from raytrain.pipelines.autolabel.geometry import iou_matrix
from raytrain.pipelines.common import MANIFEST


@dataclass
class EvalConfig:
    iou: list[float] = field(default_factory=lambda: [0.5, 0.7])
    classes: list[str] = field(default_factory=lambda: ["car", "truck", "pedestrian", "cyclist"])
    x_range: tuple[float, float] = (-50.0, 50.0)  # ViLGOD's evaluation range [V]
    y_range: tuple[float, float] = (-20.0, 20.0)
    min_points: int = 5
    moving_speed: float = 1.0  # m/s [U]


@dataclass
class FrameEval:
    """One frame's predictions and ground truth, vehicle frame."""
    pred_boxes: np.ndarray  # (P, 7)
    pred_scores: np.ndarray  # (P,)
    pred_labels: list[str]
    gt_boxes: np.ndarray  # (G, 7)
    gt_classes: np.ndarray  # (G,)
    gt_speeds: np.ndarray  # (G,)
    gt_points: np.ndarray  # (G,)


def average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP of score-ranked detections with true-positive flags `tp`."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = tp[order].astype(np.float64)
    recall = np.concatenate([[0.0], np.cumsum(hits) / n_gt])
    precision = np.concatenate([[1.0], np.cumsum(hits) / np.arange(1, len(hits) + 1)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * envelope[1:]))


def match_frame(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, ignore: np.ndarray, threshold: float,
                mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept (P,) bool, tp (P,) bool): greedy matching; predictions matching only ignored boxes are not kept."""
    iou = iou_matrix(pred, gt, mode)
    taken = np.zeros(len(gt), bool)
    kept, tp = np.ones(len(pred), bool), np.zeros(len(pred), bool)
    for i in np.argsort(-scores, kind="stable"):
        cand = np.where(~ignore & ~taken, iou[i], -1.0) if len(gt) else np.zeros(0)
        if len(cand) and cand.max() >= threshold:
            j = int(cand.argmax())
            taken[j], tp[i] = True, True
        elif len(gt) and np.where(ignore, iou[i], -1.0).max() >= threshold:
            kept[i] = False
    return kept, tp


def _in_range(boxes: np.ndarray, cfg: EvalConfig) -> np.ndarray:
    return ((boxes[:, 0] >= cfg.x_range[0]) & (boxes[:, 0] <= cfg.x_range[1])
            & (boxes[:, 1] >= cfg.y_range[0]) & (boxes[:, 1] <= cfg.y_range[1]))


def subset_ap(frames: list[FrameEval], cfg: EvalConfig, threshold: float, mode: str, cls: str | None = None,
              motion: str | None = None) -> float:
    """AP over `frames` for one class (None = class-agnostic) and motion subset (None, "moving", "static")."""
    all_scores, all_tp, n_gt = [], [], 0
    for f in frames:
        participant = np.isin(f.gt_classes, cfg.classes) & _in_range(f.gt_boxes, cfg)
        wanted = participant & (f.gt_points >= cfg.min_points)
        if cls is not None:
            wanted &= f.gt_classes == cls
        if motion is not None:
            wanted &= (f.gt_speeds >= cfg.moving_speed) == (motion == "moving")
        ignore = participant & ~wanted
        if cls is not None:  # another class's box is a wrong label, not something to ignore
            ignore &= f.gt_classes == cls
        pick = _in_range(f.pred_boxes, cfg)
        if cls is not None:
            pick &= np.array([lab == cls for lab in f.pred_labels], bool).reshape(-1)
        gt = participant & (wanted | ignore)
        kept, tp = match_frame(f.pred_boxes[pick], f.pred_scores[pick], f.gt_boxes[gt], ignore[gt], threshold, mode)
        all_scores.append(f.pred_scores[pick][kept])
        all_tp.append(tp[kept])
        n_gt += int(wanted.sum())
    return average_precision(np.concatenate(all_scores or [np.zeros(0)]), np.concatenate(all_tp or [np.zeros(0)]),
                             n_gt)


def _table(frames: list[FrameEval], cfg: EvalConfig, **subset: str | None) -> dict[str, float | None]:
    out = {}
    for thr in cfg.iou:
        for mode in ("3d", "bev"):
            ap = subset_ap(frames, cfg, thr, mode, **subset)
            out[f"{mode}@{thr:g}"] = None if np.isnan(ap) else round(ap, 4)
    return out


def report(frames: list[FrameEval], cfg: EvalConfig) -> dict:
    """The AP tables: class-agnostic, moving and static, and per class."""
    n_gt = sum(int((np.isin(f.gt_classes, cfg.classes) & _in_range(f.gt_boxes, cfg)
                    & (f.gt_points >= cfg.min_points)).sum()) for f in frames)
    return {"frames": len(frames), "gt_boxes": n_gt,
            "pred_boxes": sum(int(_in_range(f.pred_boxes, cfg).sum()) for f in frames),
            "class_agnostic": _table(frames, cfg), "moving": _table(frames, cfg, motion="moving"),
            "static": _table(frames, cfg, motion="static"),
            "per_class": {c: _table(frames, cfg, cls=c) for c in cfg.classes}}


def load_frames(sequences: list[Path], labels: Path) -> tuple[list[FrameEval], list[str]]:
    """Ground truth of `sequences` beside the labels under `labels`; a sequence without labels has no predictions.

    Returns the frames and the ids of the sequences whose labels are missing.
    """
    frames, missing = [], []
    for path in sequences:
        seq = Sequence(path)
        if not (labels / seq.id / MANIFEST).exists():
            missing.append(seq.id)
        for i in range(seq.num_frames):
            gt = seq.frame(i).gt
            if gt is None:
                raise LidarFormatError(f"{seq.frame_path(i)}: no ground truth (gt_boxes) to evaluate against")
            label_file = labels / seq.id / "labels" / f"{i:06d}.json"
            objects = json.loads(label_file.read_text())["objects"] if label_file.exists() else []
            frames.append(FrameEval(np.array([o["box"] for o in objects], np.float64).reshape(-1, 7),
                                    np.array([o["score"] for o in objects], np.float64),
                                    [o["label"] for o in objects], gt.boxes.astype(np.float64), gt.classes,
                                    gt.speeds, gt.num_points))
    return frames, missing
