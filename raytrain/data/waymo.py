"""Waymo Open Dataset v2 (parquet) -> the raytrain LiDAR sequence format (`lidar.py`), one sequence per segment.

Reads the components of a split directory (`lidar/`, `lidar_calibration/`, `vehicle_pose/`, `camera_image/`,
`camera_calibration/`, optionally `lidar_box/`, each `<segment>.parquet`): the first return of one LiDAR's range
image (default the top LiDAR, `laser_name` 1) turned into vehicle-frame points with the calibration's beam
inclinations and extrinsic (WOD's range-image convention: row 0 is the highest beam, column azimuths run from +pi
down to -pi, corrected by the extrinsic's yaw), the world-from-vehicle pose, the camera JPEGs with their pinhole
intrinsics and extrinsics (converted from WOD's x-forward camera axes to OpenCV axes; lens distortion is ignored),
and the 3D boxes as ground truth. Not handled: the top LiDAR's per-pixel rolling-shutter poses, second returns, and
camera/LiDAR timing (spec trap 2); WOD's licence is non-commercial, so tests use files they write themselves.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raytrain.data.lidar import Camera, Frame, GroundTruth, LidarFormatError, write_frame, write_meta

CAMERA_NAMES = {1: "front", 2: "front_left", 3: "front_right", 4: "side_left", 5: "side_right"}
BOX_TYPES = {1: "vehicle", 2: "pedestrian", 3: "sign", 4: "cyclist"}
WOD_FROM_OPENCV_CAMERA = np.array([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # columns: OpenCV axes

LIDAR = "[LiDARComponent].range_image_return1"
CALIB = "[LiDARCalibrationComponent]"
CAM = "[CameraCalibrationComponent]"
BOX = "[LiDARBoxComponent]"


def _table(root: Path, component: str, segment: str, required: bool = True) -> dict[str, list] | None:
    path = root / component / f"{segment}.parquet"
    if not path.exists():
        if required:
            raise LidarFormatError(f"{path}: missing (needed for segment {segment})")
        return None
    return pq.read_table(path).to_pydict()


def _rows(table: dict[str, list], **match: object) -> list[dict[str, object]]:
    n = len(next(iter(table.values())))
    return [{k: v[i] for k, v in table.items()} for i in range(n)
            if all(table[f"key.{k}"][i] == want for k, want in match.items())]


def range_image_points(ranges: np.ndarray, inclinations: np.ndarray, extrinsic: np.ndarray) -> np.ndarray:
    """(H, W, C) range image (channel 0 range, 1 intensity), ascending beam inclinations (H,), vehicle_from_lidar
    -> (N, 4) vehicle-frame points with intensity, for the pixels with a return (range > 0)."""
    h, w = ranges.shape[:2]
    incl = np.asarray(inclinations, np.float64)[::-1]  # row 0 is the highest beam
    az_correction = np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
    azimuth = ((np.arange(w, 0, -1) - 0.5) / w * 2 - 1) * np.pi - az_correction
    r = ranges[..., 0]
    valid = r > 0
    cos_i = np.cos(incl)[:, None]
    xyz = np.stack([r * cos_i * np.cos(azimuth)[None], r * cos_i * np.sin(azimuth)[None],
                    r * np.sin(incl)[:, None]], -1)[valid]
    vehicle = xyz @ extrinsic[:3, :3].T + extrinsic[:3, 3]
    return np.column_stack([vehicle, ranges[..., 1][valid]]).astype(np.float32)


def _inclinations(calib: dict[str, object], height: int) -> np.ndarray:
    values = calib.get(f"{CALIB}.beam_inclination.values")
    if values is not None and len(values) == height:
        return np.asarray(values, np.float64)
    lo, hi = calib[f"{CALIB}.beam_inclination.min"], calib[f"{CALIB}.beam_inclination.max"]
    step = (hi - lo) / height
    return np.linspace(lo + step / 2, hi - step / 2, height)  # uniform beams, as WOD computes them


def _cameras(table: dict[str, list]) -> dict[int, Camera]:
    cams = {}
    for row in _rows(table):
        K = np.array([[row[f"{CAM}.intrinsic.f_u"], 0, row[f"{CAM}.intrinsic.c_u"]],
                      [0, row[f"{CAM}.intrinsic.f_v"], row[f"{CAM}.intrinsic.c_v"]], [0, 0, 1]])
        vehicle_from_wod = np.asarray(row[f"{CAM}.extrinsic.transform"], np.float64).reshape(4, 4)
        name = int(row["key.camera_name"])
        cams[name] = Camera(CAMERA_NAMES.get(name, f"camera{name}"), int(row[f"{CAM}.width"]),
                            int(row[f"{CAM}.height"]), K, vehicle_from_wod @ WOD_FROM_OPENCV_CAMERA)
    return cams


def _decode(jpeg: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def convert_segment(root: Path, segment: str, out: Path, laser: int = 1) -> Path:
    """Write one WOD v2 segment as a raytrain sequence `out/<segment>` and return its path."""
    lidar = _table(root, "lidar", segment)
    calib = _rows(_table(root, "lidar_calibration", segment), laser_name=laser)
    if not calib:
        raise LidarFormatError(f"{root}/lidar_calibration/{segment}.parquet: no row for laser_name={laser}")
    extrinsic = np.asarray(calib[0][f"{CALIB}.extrinsic.transform"], np.float64).reshape(4, 4)
    poses = {row["key.frame_timestamp_micros"]: row for row in _rows(_table(root, "vehicle_pose", segment))}
    cameras = _cameras(_table(root, "camera_calibration", segment))
    images = _table(root, "camera_image", segment, required=False)
    boxes = _table(root, "lidar_box", segment, required=False)
    track_ids: dict[str, int] = {}
    seq_root = out / segment
    rows = sorted(_rows(lidar, laser_name=laser), key=lambda r: r["key.frame_timestamp_micros"])
    for i, row in enumerate(rows):
        ts = row["key.frame_timestamp_micros"]
        ranges = np.asarray(row[f"{LIDAR}.values"], np.float32).reshape(row[f"{LIDAR}.shape"])
        points = range_image_points(ranges, _inclinations(calib[0], ranges.shape[0]), extrinsic)
        pose_row = poses.get(ts)
        pose = (np.asarray(pose_row["[VehiclePoseComponent].world_from_vehicle.transform"], np.float64).reshape(4, 4)
                if pose_row else np.full((4, 4), np.nan))  # the reader reports it as a bad pose
        frame_images = {}
        if images is not None:
            for img in _rows(images, frame_timestamp_micros=ts):
                cam = cameras.get(int(img["key.camera_name"]))
                if cam is not None:
                    frame_images[cam.name] = _decode(img["[CameraImageComponent].image"])
        gt = None
        if boxes is not None:
            frame_boxes = _rows(boxes, frame_timestamp_micros=ts)
            ids = [track_ids.setdefault(b["key.laser_object_id"], len(track_ids) + 1) for b in frame_boxes]
            gt = GroundTruth(
                np.array([[b[f"{BOX}.box.center.x"], b[f"{BOX}.box.center.y"], b[f"{BOX}.box.center.z"],
                           b[f"{BOX}.box.size.x"], b[f"{BOX}.box.size.y"], b[f"{BOX}.box.size.z"],
                           b[f"{BOX}.box.heading"]] for b in frame_boxes], np.float32).reshape(-1, 7),
                np.array(ids, np.int32), np.array([BOX_TYPES.get(int(b[f"{BOX}.type"]), "other") for b in frame_boxes]),
                np.array([np.hypot(b.get(f"{BOX}.speed.x") or 0, b.get(f"{BOX}.speed.y") or 0)
                          for b in frame_boxes], np.float32),
                np.array([b.get(f"{BOX}.num_lidar_points_in_box") or 0 for b in frame_boxes], np.int32))
        write_frame(seq_root, Frame(i, ts * 1e-6, points, pose, frame_images, gt))
    dt = (rows[-1]["key.frame_timestamp_micros"] - rows[0]["key.frame_timestamp_micros"]) * 1e-6 / max(len(rows) - 1, 1)
    write_meta(seq_root, segment, len(rows), dt or 0.1, [cameras[k] for k in sorted(cameras)])
    return seq_root


def convert(root: str | Path, out: str | Path, laser: int = 1) -> list[Path]:
    """Convert every segment of a WOD v2 split directory (one `lidar/<segment>.parquet` each)."""
    root, out = Path(root), Path(out)
    segments = sorted(p.stem for p in (root / "lidar").glob("*.parquet"))
    if not segments:
        raise LidarFormatError(f"waymo.path={root}: no lidar/<segment>.parquet files (a WOD v2 split directory)")
    return [convert_segment(root, s, out, laser) for s in segments]
