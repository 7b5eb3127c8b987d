"""The Waymo Open Dataset v2 reader on parquet files written here in WOD's layout and column names."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain.data.lidar import Sequence
from raytrain.data.waymo import convert, range_image_points
from raytrain.pipelines.autolabel.project import project

SEG = "segment-0001"
INCL = [-0.1, 0.0, 0.1]  # ascending, as WOD stores them


def extrinsic(yaw: float, t: tuple[float, float, float]) -> np.ndarray:
    T = np.eye(4)
    T[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    T[:3, 3] = t
    return T


def write(root, component: str, rows: list[dict]) -> None:
    (root / component).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / component / f"{SEG}.parquet")


def test_range_image_convention() -> None:
    ranges = np.zeros((3, 8, 4), np.float32)
    ranges[0, 2] = [10.0, 0.5, 0, 0]  # highest beam, third column
    pts = range_image_points(ranges, np.array(INCL), extrinsic(0.0, (1.0, 0.0, 2.0)))
    az = ((8 - 2 - 0.5) / 8 * 2 - 1) * np.pi  # columns run from +pi down to -pi
    expected = [10 * np.cos(0.1) * np.cos(az) + 1, 10 * np.cos(0.1) * np.sin(az), 10 * np.sin(0.1) + 2, 0.5]
    np.testing.assert_allclose(pts, [expected], atol=1e-5)
    turned = range_image_points(ranges, np.array(INCL), extrinsic(np.pi / 2, (1.0, 0.0, 2.0)))
    np.testing.assert_allclose(turned, pts, atol=1e-5)  # a column's vehicle azimuth does not depend on the mount yaw


def test_segment_converts_to_a_readable_sequence(tmp_path) -> None:
    root, rng = tmp_path / "wod", np.random.default_rng(0)
    stamps = [1_000_000, 1_100_000]
    ranges = np.where(rng.random((3, 8)) < 0.8, rng.uniform(5, 30, (3, 8)), -1.0)
    image = np.array(Image.new("RGB", (16, 8), (200, 30, 30)))
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, format="JPEG")
    write(root, "lidar", [{"key.segment_context_name": SEG, "key.frame_timestamp_micros": ts, "key.laser_name": 1,
                           "[LiDARComponent].range_image_return1.values":
                               np.stack([ranges, np.full((3, 8), 0.3), np.zeros((3, 8)), np.zeros((3, 8))], -1)
                               .ravel().tolist(),
                           "[LiDARComponent].range_image_return1.shape": [3, 8, 4]} for ts in stamps])
    write(root, "lidar_calibration", [{"key.segment_context_name": SEG, "key.laser_name": 1,
                                       "[LiDARCalibrationComponent].extrinsic.transform":
                                           extrinsic(0.1, (1.4, 0, 2.2)).ravel().tolist(),
                                       "[LiDARCalibrationComponent].beam_inclination.min": -0.1,
                                       "[LiDARCalibrationComponent].beam_inclination.max": 0.1,
                                       "[LiDARCalibrationComponent].beam_inclination.values": INCL}])
    write(root, "vehicle_pose", [{"key.segment_context_name": SEG, "key.frame_timestamp_micros": ts,
                                  "[VehiclePoseComponent].world_from_vehicle.transform":
                                      extrinsic(0.0, (i * 1.0, 0, 0)).ravel().tolist()}
                                 for i, ts in enumerate(stamps)])
    write(root, "camera_calibration", [{"key.segment_context_name": SEG, "key.camera_name": 1,
                                        "[CameraCalibrationComponent].intrinsic.f_u": 10.0,
                                        "[CameraCalibrationComponent].intrinsic.f_v": 10.0,
                                        "[CameraCalibrationComponent].intrinsic.c_u": 8.0,
                                        "[CameraCalibrationComponent].intrinsic.c_v": 4.0,
                                        "[CameraCalibrationComponent].extrinsic.transform":
                                            extrinsic(0.0, (1.5, 0, 1.6)).ravel().tolist(),
                                        "[CameraCalibrationComponent].width": 16,
                                        "[CameraCalibrationComponent].height": 8}])
    write(root, "camera_image", [{"key.segment_context_name": SEG, "key.frame_timestamp_micros": ts,
                                  "key.camera_name": 1, "[CameraImageComponent].image": jpeg.getvalue()}
                                 for ts in stamps])
    write(root, "lidar_box", [{"key.segment_context_name": SEG, "key.frame_timestamp_micros": ts,
                               "key.laser_object_id": "abc", "[LiDARBoxComponent].box.center.x": 8.0,
                               "[LiDARBoxComponent].box.center.y": 1.0, "[LiDARBoxComponent].box.center.z": 0.9,
                               "[LiDARBoxComponent].box.size.x": 4.5, "[LiDARBoxComponent].box.size.y": 2.0,
                               "[LiDARBoxComponent].box.size.z": 1.7, "[LiDARBoxComponent].box.heading": 0.2,
                               "[LiDARBoxComponent].type": 1, "[LiDARBoxComponent].speed.x": 3.0,
                               "[LiDARBoxComponent].speed.y": 4.0,
                               "[LiDARBoxComponent].num_lidar_points_in_box": 120} for ts in stamps])
    (path,) = convert(root, tmp_path / "seqs")
    seq = Sequence(path)
    assert seq.num_frames == 2 and abs(seq.frame_dt - 0.1) < 1e-9 and [c.name for c in seq.cameras] == ["front"]
    frame = seq.frame(1)
    assert frame.problems == [] and len(frame.points) == int((ranges > 0).sum())
    np.testing.assert_allclose(frame.pose[:3, 3], [1.0, 0, 0])
    assert frame.images["front"].shape == (8, 16, 3) and abs(int(frame.images["front"][4, 8, 0]) - 200) < 10
    uv, z = project(seq.cameras[0], np.array([[11.5, 0.0, 1.6]]))  # 10 m straight ahead of the camera
    np.testing.assert_allclose(uv[0], [8.0, 4.0], atol=1e-6)
    assert z[0] == np.float64(10.0)
    (left_up,), _ = project(seq.cameras[0], np.array([[11.5, 1.0, 2.6]]))  # left and up: smaller u and v
    np.testing.assert_allclose(left_up, [7.0, 3.0], atol=1e-6)
    assert frame.gt.classes.tolist() == ["vehicle"] and frame.gt.speeds[0] == 5.0 and frame.gt.track_ids[0] == 1
