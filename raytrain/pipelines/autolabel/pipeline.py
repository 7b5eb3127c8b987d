"""Auto-label one sequence: the stages in order, frames streamed, tracks and boxes at the end (spec 2.4).

Frames are read one at a time. Each is cropped, its ground removed, its non-ground points moved to the world frame
and (mode `full`) given VL features from the cameras. A frame is detected (motion cue, clustering, filters, static
gate) as soon as the frames of its motion window have been read, so at most `motion.window` frames are held. The
tracker follows the detections frame by frame; boxes and labels need whole tracks, so they come at the end, and the
per-frame labels are returned in the vehicle frame of each frame. Mode `moving_only` is the MI-UP-like baseline:
moving clusters only, no VL features, no gate, class-agnostic labels ("object").
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raytrain.data.lidar import Camera, Frame, Sequence, transform_boxes, transform_points
from raytrain.pipelines.autolabel import motion
from raytrain.pipelines.autolabel.boxes import fit_track
from raytrain.pipelines.autolabel.cluster import Detection, cluster_points, clusters, keep_cluster
from raytrain.pipelines.autolabel.config import AutolabelConfig
from raytrain.pipelines.autolabel.ground import ground_at, height_above, remove_ground
from raytrain.pipelines.autolabel.label import Prompts, passes_gate, track_label
from raytrain.pipelines.autolabel.project import point_features
from raytrain.pipelines.autolabel.track import KalmanTracker
from raytrain.pipelines.autolabel.vlm import ImageTextModel, feature_map

AGNOSTIC = "object"


@dataclass
class PreparedFrame:
    frame: Frame
    nonground: np.ndarray  # (M,) indices into frame.points
    plane: np.ndarray  # (4,) ground plane, vehicle frame
    world: np.ndarray  # (M, 3) non-ground points, world frame
    motion: motion.MotionFrame
    features: np.ndarray | None  # (M, D) unit VL features (zeros where not visible)
    visible: np.ndarray  # (M,) bool


@dataclass
class FrameLabels:
    index: int
    timestamp: float
    problems: list[str]
    boxes: np.ndarray  # (K, 7) vehicle frame
    track_ids: np.ndarray  # (K,)
    labels: list[str]
    scores: np.ndarray  # (K,)
    moving: np.ndarray  # (K,) bool
    plane: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"frame": self.index, "timestamp": self.timestamp, "problems": self.problems,
                "ground_plane": self.plane,
                "objects": [{"box": [round(float(v), 4) for v in b], "track_id": int(t), "label": lab,
                             "score": round(float(s), 4), "moving": bool(m)}
                            for b, t, lab, s, m in zip(self.boxes, self.track_ids, self.labels, self.scores,
                                                       self.moving)]}


@dataclass
class SequenceLabels:
    frames: list[FrameLabels]
    tracks: int
    problems: Counter = field(default_factory=Counter)  # problem kind -> frames


class SequenceLabeler:
    """Runs the stages over one sequence. `model`/`prompts` may be None in moving_only mode."""

    def __init__(self, cfg: AutolabelConfig, model: ImageTextModel | None, prompts: Prompts | None):
        self.cfg = cfg
        self.model = model
        self.prompts = prompts
        self.full = cfg.mode == "full"

    def prepare(self, frame: Frame, cameras: list[Camera]) -> PreparedFrame:
        cfg = self.cfg
        xyz = frame.points[:, :3].astype(np.float64)
        ground, plane = remove_ground(xyz, cfg.ground, seed=frame.index)
        in_crop = (np.abs(xyz[:, 0]) <= cfg.crop) & (np.abs(xyz[:, 1]) <= cfg.crop)
        nonground = np.flatnonzero(~ground & in_crop)
        features, visible = None, np.zeros(len(nonground), bool)
        if self.full and frame.images:
            maps = {name: feature_map(self.model, img, cfg.vlm) for name, img in frame.images.items()}
            features, visible = point_features(xyz, nonground, cameras, maps, cfg.vlm.stride, cfg.proj)
        world = transform_points(frame.pose, xyz[nonground])
        return PreparedFrame(frame, nonground, plane, world, motion.MotionFrame.build(world, cfg.motion), features,
                             visible)

    def detect(self, p: PreparedFrame, refs: list[motion.MotionFrame]) -> list[Detection]:
        cfg = self.cfg
        xyz = p.frame.points[p.nonground, :3].astype(np.float64)
        height = height_above(p.plane, xyz)
        groups = [idx for idx in clusters(cluster_points(xyz, cfg.cluster))
                  if keep_cluster(height[idx], xyz[idx, 2], cfg.cluster)]
        if not groups:
            return []
        points = np.concatenate(groups)  # the motion cue is only needed where there are objects
        moving = np.zeros(len(xyz), bool)
        moving[points] = motion.moving_mask(motion.entropy(p.motion, points, refs, cfg.motion), cfg.motion)
        found = []
        for idx in groups:
            centre = xyz[idx, :2].mean(0)
            floor = transform_points(p.frame.pose, np.array([[*centre, ground_at(p.plane, centre[None])[0]]]))[0, 2]
            vis = idx[p.visible[idx]]
            fsum = p.features[vis].sum(0) if p.features is not None else None
            det = Detection(p.frame.index, p.world[idx], float(floor), float(moving[idx].mean()), fsum, len(vis))
            if det.moving_frac >= cfg.cluster.moving_frac or (self.full and passes_gate(det.feature(), self.prompts,
                                                                                         cfg.label)):
                found.append(det)
        return found

    def run(self, seq: Sequence, on_frame: Callable[[PreparedFrame], None] | None = None) -> SequenceLabels:
        cfg, T = self.cfg, seq.num_frames
        tracker = KalmanTracker(cfg.track)
        refs: dict[int, motion.MotionFrame | None] = {}
        pending: deque[tuple[Frame, PreparedFrame | None]] = deque()
        frames: list[Frame] = []
        problems: Counter = Counter()
        planes: dict[int, np.ndarray] = {}

        def detect_and_track(frame: Frame, prep: PreparedFrame | None) -> None:
            window = [refs[f] for f in motion.window(frame.index, T, cfg.motion.window) if refs.get(f) is not None]
            tracker.step(frame.index, frame.timestamp, self.detect(prep, window) if prep else [])

        for frame in seq.frames():
            for problem in frame.problems:
                problems[problem.split(":")[0]] += 1
            prep = None
            if frame.usable:
                prep = self.prepare(frame, seq.cameras)
                planes[frame.index] = prep.plane
                if on_frame:
                    on_frame(prep)
            refs[frame.index] = prep.motion if prep else None
            pending.append((frame, prep))
            frames.append(Frame(frame.index, frame.timestamp, frame.points[:0], frame.pose, {}, None,
                                frame.problems))  # keep only what the labels need
            while pending and motion.window(pending[0][0].index, T, cfg.motion.window)[-1] <= frame.index:
                detect_and_track(*pending.popleft())
            first_needed = motion.window(pending[0][0].index if pending else frame.index + 1, T, cfg.motion.window)[0]
            for f in [f for f in refs if f < first_needed]:
                del refs[f]
        while pending:
            detect_and_track(*pending.popleft())
        return self.boxes_and_labels(frames, tracker, planes, problems)

    def boxes_and_labels(self, frames: list[Frame], tracker: KalmanTracker, planes: dict[int, np.ndarray],
               problems: Counter) -> SequenceLabels:
        cfg = self.cfg
        ego_xy = {f.index: f.pose[:2, 3] for f in frames}
        per_frame: dict[int, list[tuple[np.ndarray, int, str, float, bool]]] = {f.index: [] for f in frames}
        kept = 0
        for track in tracker.tracks():
            dets = list(track.detections.values())
            moving = np.mean([d.moving_frac >= cfg.cluster.moving_frac for d in dets]) >= 0.5  # most detections
            fitted = fit_track(track, bool(moving), ego_xy, cfg.box)
            if fitted is None:
                continue
            quality = min(1.0, len(dets) / (2 * cfg.track.min_len))
            if self.full:
                fsum = [d.feature_sum for d in dets if d.n_visible]
                feature = np.sum(fsum, 0) / max(np.linalg.norm(np.sum(fsum, 0)), 1e-8) if fsum else None
                label, prob = track_label(feature, self.prompts, cfg.label)
                if label is None:
                    continue
            else:
                label, prob = AGNOSTIC, 1.0
            kept += 1
            for f, box in fitted.boxes.items():
                per_frame[f].append((box, kept, label, prob * quality, fitted.moving))
        out = []
        for frame in frames:
            rows = per_frame[frame.index] if frame.usable else []
            world = np.array([r[0] for r in rows]).reshape(-1, 7)
            plane = planes.get(frame.index)
            out.append(FrameLabels(
                frame.index, frame.timestamp, frame.problems, transform_boxes(np.linalg.inv(frame.pose), world),
                np.array([r[1] for r in rows], np.int64), [r[2] for r in rows], np.array([r[3] for r in rows]),
                np.array([r[4] for r in rows], bool), None if plane is None else [float(v) for v in plane]))
        return SequenceLabels(out, kept, problems)
