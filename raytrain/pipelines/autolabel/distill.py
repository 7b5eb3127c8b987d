"""The student's point head: distil the auto-labeler's per-point VL features into a LiDAR-only pillar network,
then label points and boxes from LiDAR alone by cosine similarity with text embeddings (spec 2.3, the point head).

Training frames are the labelled sequences' non-ground points with the fp16 features the auto-labeler saved; the loss
is 1 - cos over camera-visible points (points no camera saw have no target). Whole sequences are held out for the
report: per-point query accuracy against the generator's point labels (split into points a camera saw and points
none did, where only the student can answer), and per-class AP of the auto-label boxes relabelled by the student.
The student here is the point head only; UP-VL's class-agnostic box head (CenterPoint-style) is not built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raytrain.data.lidar import Sequence
from raytrain.models.pillars import PillarNet, PillarNetConfig
from raytrain.pipelines.autolabel.evaluate import EvalConfig, FrameEval, report
from raytrain.pipelines.autolabel.geometry import points_in_box
from raytrain.pipelines.autolabel.ground import height_above
from raytrain.pipelines.autolabel.label import Prompts, prompt_probabilities
from raytrain.pipelines.common import MANIFEST
from raytrain.train.objectives import cosine_distillation

log = logging.getLogger("raytrain")


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 1e-4
    holdout_sequences: int = 1  # the last sequences are held out for the report
    seed: int = 0
    model: PillarNetConfig = field(default_factory=PillarNetConfig)


@dataclass
class PointFrame:
    """One frame's non-ground points as the student sees them, with the teacher's features and the ground truth."""
    xyz: torch.Tensor  # (N, 3) vehicle frame
    height: torch.Tensor  # (N,) above the ground plane
    intensity: torch.Tensor  # (N,)
    target: torch.Tensor  # (N, D) teacher features, zero where not visible
    visible: torch.Tensor  # (N,) bool
    gt_class: np.ndarray | None  # (N,) the class each point hit ("" = none)
    labels: list[dict]  # the auto labels of the frame
    gt: FrameEval | None  # ground truth boxes for the AP report (predictions filled in later)


def load_frames(seq: Sequence, labels: Path) -> list[PointFrame]:
    root = labels / seq.id
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"labels={labels}: {seq.id} is not labelled (no {MANIFEST})")
    frames = []
    for i in range(seq.num_frames):
        shard = root / "features" / f"{i:06d}.npz"
        if not shard.exists():
            continue
        frame = seq.frame(i)
        with np.load(shard) as z:
            index, visible, features, plane = z["points_index"], z["visible"], z["features"], z["ground_plane"]
        xyz = frame.points[index, :3].astype(np.float64)
        target = np.zeros((len(index), features.shape[1]), np.float32)
        target[visible] = features.astype(np.float32)
        gt_class, gt = None, None
        if frame.gt is not None:
            lookup = dict(zip(frame.gt.track_ids.tolist(), frame.gt.classes.tolist()))
            gt_class = np.array([lookup.get(int(t), "") for t in frame.gt.point_ids[index]])
            g = frame.gt
            gt = FrameEval(np.zeros((0, 7)), np.zeros(0), [], g.boxes.astype(np.float64), g.classes, g.speeds,
                           g.num_points)
        frames.append(PointFrame(torch.from_numpy(xyz).float(), torch.from_numpy(height_above(plane, xyz)).float(),
                                 torch.from_numpy(frame.points[index, 3]).float(), torch.from_numpy(target),
                                 torch.from_numpy(visible), gt_class,
                                 json.loads((root / "labels" / f"{i:06d}.json").read_text())["objects"], gt))
    return frames


def train(frames: list[PointFrame], cfg: DistillConfig) -> tuple[PillarNet, list[float]]:
    """Fit the pillar network to the teacher features, one frame per step; returns it and the loss per step."""
    torch.manual_seed(cfg.seed)
    model = PillarNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    order = np.random.default_rng(cfg.seed)
    losses = []
    model.train()
    for step in range(cfg.steps):
        f = frames[order.integers(len(frames))]
        loss = cosine_distillation(model(f.xyz, f.height, f.intensity), f.target, f.visible)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("distill step %d loss %.4f", step, losses[-1])
    return model.eval(), losses


@torch.no_grad()
def point_query(model: PillarNet, f: PointFrame, prompts: Prompts, tau: float) -> np.ndarray:
    """(N, Q) prompt probabilities of every point from LiDAR alone."""
    return prompt_probabilities(model(f.xyz, f.height, f.intensity).numpy(), prompts, tau)


def label_boxes(probs: np.ndarray, xyz: np.ndarray, boxes: np.ndarray, prompts: Prompts) -> list[str | None]:
    """Each box's label: the argmax of its points' mean prompt probabilities; None if a background prompt wins."""
    out = []
    for box in boxes:
        inside = points_in_box(xyz, box)
        if not inside.any():
            out.append(None)
            continue
        k = int(probs[inside].mean(0).argmax())
        out.append(prompts.names[k] if k < prompts.participants else None)
    return out


def held_out_report(model: PillarNet, frames: list[PointFrame], prompts: Prompts, tau: float,
                    eval_cfg: EvalConfig) -> dict:
    """Point-query accuracy (camera-visible and unseen points) and per-class AP of student- vs teacher-labelled boxes."""
    hits = {"camera": [0, 0], "no_camera": [0, 0], "teacher_camera": [0, 0]}
    student, teacher = [], []
    background = set(prompts.names[prompts.participants:])
    for f in frames:
        probs = point_query(model, f, prompts, tau)
        pred = np.array(prompts.names)[probs.argmax(1)]
        if f.gt_class is not None:
            on_object = f.gt_class != ""
            right = np.where(np.isin(f.gt_class, prompts.names[:prompts.participants]), pred == f.gt_class,
                             np.isin(pred, list(background)))
            vis = f.visible.numpy()
            for key, mask in (("camera", on_object & vis), ("no_camera", on_object & ~vis)):
                hits[key][0] += int(right[mask].sum())
                hits[key][1] += int(mask.sum())
            teacher_pred = np.array(prompts.names)[prompt_probabilities(f.target.numpy()[vis], prompts, tau).argmax(1)]
            t_right = np.where(np.isin(f.gt_class[vis], prompts.names[:prompts.participants]),
                               teacher_pred == f.gt_class[vis], np.isin(teacher_pred, list(background)))
            hits["teacher_camera"][0] += int(t_right[on_object[vis]].sum())
            hits["teacher_camera"][1] += int(on_object[vis].sum())
        if f.gt is not None:
            boxes = np.array([o["box"] for o in f.labels], np.float64).reshape(-1, 7)
            scores = np.array([o["score"] for o in f.labels], np.float64)
            relabelled = label_boxes(probs, f.xyz.numpy(), boxes, prompts)
            keep = np.array([lab is not None for lab in relabelled], bool)
            student.append(FrameEval(boxes[keep], scores[keep], [lab for lab in relabelled if lab], f.gt.gt_boxes,
                                     f.gt.gt_classes, f.gt.gt_speeds, f.gt.gt_points))
            teacher.append(FrameEval(boxes, scores, [o["label"] for o in f.labels], f.gt.gt_boxes,
                                     f.gt.gt_classes, f.gt.gt_speeds, f.gt.gt_points))
    accuracy = {k: round(a / n, 4) if n else None for k, (a, n) in hits.items()}
    return {"point_accuracy": accuracy, "points": {k: n for k, (_, n) in hits.items()},
            "per_class_ap_student_labels": report(student, eval_cfg)["per_class"] if student else None,
            "per_class_ap_teacher_labels": report(teacher, eval_cfg)["per_class"] if teacher else None}
