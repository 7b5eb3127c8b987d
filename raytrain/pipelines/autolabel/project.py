"""Stage 3, per-point vision-language features: project LiDAR points into each camera and sample its feature map.

A point gets a camera's feature if it lands in the image, in front of the camera, and passes a depth test: its depth
is within `depth_tol` of the nearest LiDAR depth splatted at its pixel (a z-buffer of the sweep itself, so points
behind a nearer surface get no feature). Features are sampled bilinearly, averaged over the cameras that see the
point and L2-normalised; `visible` says which points got any. Points outside every camera (WOD and the generator have
no rear camera) stay invisible, which the static gate and the labels treat as unknown, never as background.
"""

from __future__ import annotations

import numpy as np

from raytrain.data.lidar import Camera, transform_points
from raytrain.pipelines.autolabel.config import ProjectionConfig
from raytrain.pipelines.autolabel.vlm import sample_map


def project(cam: Camera, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vehicle-frame points (N, 3) -> pixel coordinates (N, 2) and depth (N,) along the camera's z axis."""
    p = transform_points(np.linalg.inv(cam.vehicle_from_camera), xyz)
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (p @ cam.intrinsics.T)[:, :2] / z[:, None]
    return uv, z


def unproject(cam: Camera, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Inverse of `project`: pixels and depths -> vehicle-frame points."""
    rays = np.linalg.solve(cam.intrinsics, np.column_stack([uv, np.ones(len(uv))]).T).T
    return transform_points(cam.vehicle_from_camera, rays * depth[:, None])


def visible_in(cam: Camera, xyz: np.ndarray, cfg: ProjectionConfig) -> tuple[np.ndarray, np.ndarray]:
    """(visible mask (N,), pixel coordinates (N, 2)) of points in `cam`, with the z-buffer depth test."""
    uv, z = project(cam, xyz)
    inside = (z > 0.1) & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
    visible = np.zeros(len(xyz), bool)
    if not inside.any():
        return visible, uv
    idx = np.flatnonzero(inside)
    px = np.floor(uv[idx]).astype(np.int64)
    zbuf = np.full(cam.height * cam.width, np.inf)
    r = cfg.splat
    for du in range(-r, r + 1):
        for dv in range(-r, r + 1):
            u, v = px[:, 0] + du, px[:, 1] + dv
            ok = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
            np.minimum.at(zbuf, v[ok] * cam.width + u[ok], z[idx][ok])
    visible[idx] = z[idx] <= zbuf[px[:, 1] * cam.width + px[:, 0]] + cfg.depth_tol
    return visible, uv


def point_features(xyz: np.ndarray, query: np.ndarray, cameras: list[Camera], maps: dict[str, np.ndarray],
                   stride: int, cfg: ProjectionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Features (Q, D) float32 and visibility (Q,) of the points `xyz[query]`; all of `xyz` builds the z-buffers."""
    dim = next(iter(maps.values())).shape[-1] if maps else 0
    total = np.zeros((len(query), dim), np.float32)
    seen = np.zeros(len(query), np.int32)
    for cam in cameras:
        if cam.name not in maps:
            continue
        visible, uv = visible_in(cam, xyz, cfg)
        hit = np.flatnonzero(visible[query])
        if len(hit):
            total[hit] += sample_map(maps[cam.name], uv[query[hit]], stride)
            seen[hit] += 1
    norm = np.linalg.norm(total, axis=1, keepdims=True)
    return np.divide(total, norm, out=np.zeros_like(total), where=norm > 0), seen > 0
