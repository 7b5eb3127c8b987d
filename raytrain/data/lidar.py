"""Posed LiDAR sequences with calibrated cameras: the on-disk format and its reader.

A sequence is a directory:

    <id>/meta.json            {"format": "raytrain.lidar_sequence", "version": 1, "id": str, "num_frames": T,
                               "frame_dt": s, "cameras": [{"name", "width", "height",
                               "intrinsics": 3x3, "vehicle_from_camera": 4x4}, ...]}
    <id>/frames/000000.npz    one file per frame:
        points        (N, 4) float32  x, y, z, intensity in the vehicle frame (x forward, y left, z up, metres)
        pose          (4, 4) float64  world_from_vehicle
        timestamp     ()     float64  seconds
        image_<name>  (H, W, 3) uint8 one per camera (OpenCV camera frame: x right, y down, z forward)
        optional ground truth: gt_boxes (M, 7) float32 [x, y, z, l, w, h, yaw] in the vehicle frame (z = centre),
        gt_track_ids (M,) int32, gt_classes (M,) str, gt_speeds (M,) float32 m/s, gt_num_points (M,) int32,
        gt_point_ids (N,) int32 (the track id each point hit, 0 = ground)

The reader never raises on a bad frame: it returns the frame with `problems` filled in (no points, a missing or
malformed camera image, a malformed pose, an unreadable file), so a pipeline can skip and count it. A bad `meta.json`
raises `LidarFormatError` naming the file and field, since nothing in the sequence can be read without it. The Ray
Data source that lists sequences lives with the pipeline (`pipelines/autolabel/runner.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raytrain.config import RaytrainError

FORMAT = "raytrain.lidar_sequence"
VERSION = 1


class LidarFormatError(RaytrainError):
    pass


@dataclass
class Camera:
    name: str
    width: int
    height: int
    intrinsics: np.ndarray  # (3, 3)
    vehicle_from_camera: np.ndarray  # (4, 4)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "width": self.width, "height": self.height,
                "intrinsics": self.intrinsics.tolist(), "vehicle_from_camera": self.vehicle_from_camera.tolist()}


@dataclass
class GroundTruth:
    boxes: np.ndarray  # (M, 7) vehicle frame
    track_ids: np.ndarray  # (M,)
    classes: np.ndarray  # (M,) str
    speeds: np.ndarray  # (M,)
    num_points: np.ndarray  # (M,)
    point_ids: np.ndarray | None = None  # (N,)


@dataclass
class Frame:
    index: int
    timestamp: float
    points: np.ndarray  # (N, 4)
    pose: np.ndarray  # (4, 4) world_from_vehicle
    images: dict[str, np.ndarray]
    gt: GroundTruth | None = None
    problems: list[str] = field(default_factory=list)  # reasons this frame is (partly) unusable

    @property
    def usable(self) -> bool:
        """False when the frame cannot be placed in the world or has nothing to label."""
        return not any(p.startswith(("no_points", "bad_pose", "unreadable")) for p in self.problems)


# ---- geometry shared by the generator, the pipeline and the evaluation -----------------------------------------

def transform_points(T: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to (N, 3) points."""
    return xyz @ T[:3, :3].T + T[:3, 3]


def transform_boxes(T: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform that rotates about z only to (M, 7) boxes; yaw is wrapped to (-pi, pi]."""
    out = boxes.copy()
    out[:, :3] = transform_points(T, boxes[:, :3])
    out[:, 6] = wrap_angle(boxes[:, 6] + np.arctan2(T[1, 0], T[0, 0]))
    return out


def wrap_angle(a: np.ndarray | float) -> np.ndarray | float:
    return np.pi - np.mod(np.pi - a, 2 * np.pi)


def pose_problem(pose: Any) -> str | None:
    """Why `pose` is not a rigid 4x4 transform, or None."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        return f"shape {pose.shape}, expected (4, 4)"
    if not np.isfinite(pose).all():
        return "non-finite values"
    R = pose[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-3) or not np.allclose(pose[3], [0, 0, 0, 1]):
        return "not a rigid transform"
    return None


# ---- writing ---------------------------------------------------------------------------------------------------

def write_meta(root: Path, seq_id: str, num_frames: int, frame_dt: float, cameras: list[Camera]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "id": seq_id, "num_frames": num_frames, "frame_dt": frame_dt,
            "cameras": [c.to_json() for c in cameras]}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def write_frame(root: Path, frame: Frame) -> None:
    arrays: dict[str, np.ndarray] = {"points": frame.points.astype(np.float32), "pose": frame.pose,
                                     "timestamp": np.float64(frame.timestamp)}
    arrays.update({f"image_{name}": img for name, img in frame.images.items()})
    if frame.gt is not None:
        g = frame.gt
        arrays.update(gt_boxes=g.boxes.astype(np.float32), gt_track_ids=g.track_ids.astype(np.int32),
                      gt_classes=g.classes.astype(str), gt_speeds=g.speeds.astype(np.float32),
                      gt_num_points=g.num_points.astype(np.int32))
        if g.point_ids is not None:
            arrays["gt_point_ids"] = g.point_ids.astype(np.int32)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    np.savez(root / "frames" / f"{frame.index:06d}.npz", **arrays)


# ---- reading ---------------------------------------------------------------------------------------------------

class Sequence:
    """One sequence on disk; frames are read one at a time (`frames()` streams them)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LidarFormatError(f"{meta_path}: cannot read the sequence metadata ({e})") from None
        if meta.get("format") != FORMAT:
            raise LidarFormatError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            self.id = str(meta["id"])
            self.num_frames = int(meta["num_frames"])
            self.frame_dt = float(meta.get("frame_dt", 0.1))
            self.cameras = [Camera(c["name"], int(c["width"]), int(c["height"]),
                                   np.asarray(c["intrinsics"], np.float64).reshape(3, 3),
                                   np.asarray(c["vehicle_from_camera"], np.float64).reshape(4, 4))
                            for c in meta["cameras"]]
        except (KeyError, TypeError, ValueError) as e:
            raise LidarFormatError(f"{meta_path}: missing or malformed field {e}") from None

    def frame_path(self, i: int) -> Path:
        return self.root / "frames" / f"{i:06d}.npz"

    def frame(self, i: int) -> Frame:
        try:
            with np.load(self.frame_path(i), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            return Frame(i, i * self.frame_dt, np.zeros((0, 4), np.float32), np.eye(4), {},
                         problems=[f"unreadable: {self.frame_path(i).name}: {e}"])
        points = np.asarray(data.get("points", np.zeros((0, 4))), np.float32)
        problems = []
        if points.ndim != 2 or points.shape[1] != 4 or len(points) == 0:
            problems.append(f"no_points: points has shape {points.shape}")
            points = np.zeros((0, 4), np.float32)
        elif not np.isfinite(points).all():
            keep = np.isfinite(points).all(1)
            problems.append(f"nonfinite_points: dropped {int((~keep).sum())}")
            points = points[keep]
        pose = data.get("pose")
        why = "missing" if pose is None else pose_problem(pose)
        if why:
            problems.append(f"bad_pose: {why}")
            pose = np.eye(4)
        images = {}
        for cam in self.cameras:
            img = data.get(f"image_{cam.name}")
            if img is None:
                problems.append(f"missing_camera: {cam.name}")
            elif img.shape != (cam.height, cam.width, 3):
                problems.append(f"missing_camera: {cam.name} image has shape {img.shape}, "
                                f"expected ({cam.height}, {cam.width}, 3)")
            else:
                images[cam.name] = img
        gt = None
        if "gt_boxes" in data:
            gt = GroundTruth(data["gt_boxes"].reshape(-1, 7), data["gt_track_ids"], data["gt_classes"],
                             data["gt_speeds"], data["gt_num_points"], data.get("gt_point_ids"))
        return Frame(i, float(data.get("timestamp", i * self.frame_dt)), points, np.asarray(pose, np.float64),
                     images, gt, problems)

    def frames(self) -> Iterator[Frame]:
        for i in range(self.num_frames):
            yield self.frame(i)


def find_sequences(path: str | Path) -> list[Path]:
    """Sequence directories under `path` (itself a sequence, or a directory of them), sorted by name."""
    root = Path(path)
    if not root.exists():
        raise LidarFormatError(f"data.path={path}: no such directory")
    if (root / "meta.json").exists():
        return [root]
    found = sorted(p.parent for p in root.glob("*/meta.json"))
    if not found:
        raise LidarFormatError(f"data.path={path}: no sequences (directories with a meta.json) there")
    return found
