"""Box geometry: (x, y, z, l, w, h, yaw) boxes with z at the centre; BEV rectangles, IoU, point membership, fits."""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError


def bev_corners(box: np.ndarray) -> np.ndarray:
    """(4, 2) BEV corners of one box, counter-clockwise."""
    x, y, _, l, w, _, yaw = box
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([[l, w], [-l, w], [-l, -w], [l, -w]]) / 2
    return local @ np.array([[c, s], [-s, c]]) + [x, y]


def _clip(subject: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Sutherland-Hodgman: the part of polygon `subject` left of the directed edge a -> b."""
    def inside(p: np.ndarray) -> bool:
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= -1e-12

    def cross(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        d1, d2 = q - p, b - a
        denom = d1[0] * d2[1] - d1[1] * d2[0]
        t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / denom
        return p + t * d1

    out: list[np.ndarray] = []
    for i, cur in enumerate(subject):
        prev = subject[i - 1]
        if inside(cur):
            if not inside(prev):
                out.append(cross(prev, cur))
            out.append(cur)
        elif inside(prev):
            out.append(cross(prev, cur))
    return out


def polygon_area(poly: list[np.ndarray] | np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    p = np.asarray(poly)
    return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))


def bev_intersection(a: np.ndarray, b: np.ndarray) -> float:
    poly = list(bev_corners(a))
    clip = bev_corners(b)
    for i in range(4):
        poly = _clip(poly, clip[i], clip[(i + 1) % 4])
        if not poly:
            return 0.0
    return polygon_area(poly)


def iou_matrix(a: np.ndarray, b: np.ndarray, mode: str = "3d") -> np.ndarray:
    """(M, K) IoU of boxes a (M, 7) and b (K, 7); mode "3d" or "bev"."""
    out = np.zeros((len(a), len(b)))
    if len(a) == 0 or len(b) == 0:
        return out
    ra = np.hypot(a[:, 3], a[:, 4]) / 2
    rb = np.hypot(b[:, 3], b[:, 4]) / 2
    near = np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1) < ra[:, None] + rb[None, :]
    for i, j in zip(*np.nonzero(near)):
        inter = bev_intersection(a[i], b[j])
        va, vb = a[i, 3] * a[i, 4], b[j, 3] * b[j, 4]
        if mode == "3d":
            dz = min(a[i, 2] + a[i, 5] / 2, b[j, 2] + b[j, 5] / 2) - max(a[i, 2] - a[i, 5] / 2, b[j, 2] - b[j, 5] / 2)
            inter, va, vb = inter * max(dz, 0.0), va * a[i, 5], vb * b[j, 5]
        out[i, j] = inter / max(va + vb - inter, 1e-12)
    return out


def points_in_box(xyz: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(N,) mask of the points inside one box."""
    c, s = np.cos(box[6]), np.sin(box[6])
    d = xyz - box[:3]
    local = np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]])
    return (np.abs(local) <= box[3:6] / 2).all(1)


def extent_box(xy: np.ndarray, yaw: float) -> np.ndarray:
    """Heading-aligned BEV extent of (N, 2) points: [cx, cy, l, w] with l along `yaw`."""
    c, s = np.cos(yaw), np.sin(yaw)
    local = xy @ np.array([[c, -s], [s, c]])
    lo, hi = local.min(0), local.max(0)
    mid = (lo + hi) / 2
    return np.array([c * mid[0] - s * mid[1], s * mid[0] + c * mid[1], *(hi - lo)])


def min_area_rect(xy: np.ndarray) -> np.ndarray:
    """Minimum-area BEV rectangle of (N, 2) points: [cx, cy, l, w, yaw] with l >= w, yaw in [0, pi)."""
    try:
        hull = xy[ConvexHull(xy).vertices]
    except (QhullError, ValueError):  # fewer than 3 points or collinear
        hull = xy
    best = None
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    for yaw in np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2)):
        box = extent_box(hull, yaw)
        if best is None or box[2] * box[3] < best[2] * best[3]:
            best = np.append(box, yaw)
    cx, cy, l, w, yaw = best
    if w > l:
        l, w, yaw = w, l, yaw + np.pi / 2
    return np.array([cx, cy, l, w, np.mod(yaw, np.pi)])
