"""Stage 1, ground removal: a RANSAC plane per frame (the spec's fallback for Patchwork++) and a height threshold.

The fitted plane is kept: the cluster filters measure heights above it and the box fitter puts box bottoms on it.
"""

from __future__ import annotations

import numpy as np

from raytrain.pipelines.autolabel.config import GroundConfig


def fit_plane(xyz: np.ndarray, cfg: GroundConfig, rng: np.random.Generator) -> np.ndarray:
    """(4,) plane [a, b, c, d] with unit normal (c > 0): height above it is a*x + b*y + c*z + d."""
    candidates = xyz[np.hypot(xyz[:, 0], xyz[:, 1]) >= cfg.min_range]
    if len(candidates) < 3:
        return np.array([0.0, 0.0, 1.0, 0.0])
    min_cos = np.cos(np.deg2rad(cfg.max_tilt))
    sample = candidates[rng.choice(len(candidates), min(len(candidates), 4000), replace=False)]
    best, best_inliers = np.array([0.0, 0.0, 1.0, -np.median(candidates[:, 2])]), -1
    for _ in range(cfg.iterations):
        p = sample[rng.choice(len(sample), 3, replace=False)]
        n = np.cross(p[1] - p[0], p[2] - p[0])
        norm = np.linalg.norm(n)
        if norm < 1e-9:
            continue
        n = n / norm * np.sign(n[2] or 1.0)
        if n[2] < min_cos:
            continue
        inliers = int((np.abs(sample @ n - n @ p[0]) < cfg.inlier_threshold).sum())
        if inliers > best_inliers:
            best, best_inliers = np.append(n, -n @ p[0]), inliers
    return refine(candidates, best, cfg.inlier_threshold)


def refine(xyz: np.ndarray, plane: np.ndarray, threshold: float) -> np.ndarray:
    """Least-squares plane through the inliers of `plane`."""
    inliers = xyz[np.abs(xyz @ plane[:3] + plane[3]) < threshold]
    if len(inliers) < 3:
        return plane
    centroid = inliers.mean(0)
    n = np.linalg.svd(inliers - centroid, full_matrices=False)[2][-1]
    n = n * np.sign(n[2] or 1.0)
    return np.append(n, -n @ centroid)


def height_above(plane: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    return xyz @ plane[:3] + plane[3]


def ground_at(plane: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """z of the plane below (N, 2) points."""
    return -(xy @ plane[:2] + plane[3]) / plane[2]


def remove_ground(xyz: np.ndarray, cfg: GroundConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ground mask (N,), plane (4,)) for (N, 3) vehicle-frame points."""
    plane = fit_plane(xyz, cfg, np.random.default_rng(seed))
    return height_above(plane, xyz) < cfg.height, plane
