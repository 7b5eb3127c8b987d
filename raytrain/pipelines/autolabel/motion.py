"""Stage 2, motion cue: ephemerality entropy (MODEST, as ViLGOD configures it; spec 2.2 stage 2a).

For each non-ground point of frame t (world frame), count its neighbours within `radius` in each frame of a window
of W frames, ground excluded. With c_f the count in frame f, P_f = c_f / sum(c) and H = -sum(P_f log P_f) / log W.
Static surfaces are seen in every frame (H near 1); a moving object's points have neighbours only around frame t
(H near 0). The window looks forward from t and is shifted back near the end of the sequence so that it always
holds min(W, T) frames. Reference frames are voxel-downsampled (spec trap 6), so counts are counts of occupied
voxels; the entropy compares frames, which the downsampling treats alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from raytrain.pipelines.autolabel.config import MotionConfig


def voxel_downsample(xyz: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (V, 3), voxel index of each point (N,))."""
    if len(xyz) == 0:
        return xyz.reshape(0, 3), np.zeros(0, np.int64)
    keys = np.floor(xyz / voxel).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.zeros((inverse.max() + 1, 3))
    np.add.at(sums, inverse, xyz)
    return sums / np.bincount(inverse)[:, None], inverse


@dataclass
class MotionFrame:
    """A frame's non-ground points as the motion cue sees them: voxel centroids in a KD-tree."""
    voxels: np.ndarray  # (V, 3) world centroids
    voxel_of: np.ndarray  # (N,) voxel of each point
    tree: cKDTree

    @classmethod
    def build(cls, xyz_world: np.ndarray, cfg: MotionConfig) -> "MotionFrame":
        voxels, voxel_of = voxel_downsample(xyz_world, cfg.voxel)
        return cls(voxels, voxel_of, cKDTree(voxels))


def window(t: int, num_frames: int, size: int) -> range:
    """Frames whose counts enter frame t's entropy: forward from t, shifted back at the end of the sequence."""
    start = min(t, max(0, num_frames - size))
    return range(start, min(num_frames, start + size))


def entropy(frame: MotionFrame, points: np.ndarray, refs: list[MotionFrame], cfg: MotionConfig) -> np.ndarray:
    """Normalised entropy of the neighbour counts over the frames `refs`, for `frame`'s points `points` (indices).

    Computed once per voxel of those points and given to the voxel's points.
    """
    if len(refs) < 2 or len(points) == 0:
        return np.ones(len(points))
    voxels, back = np.unique(frame.voxel_of[points], return_inverse=True)
    centroids = frame.voxels[voxels]
    counts = np.stack([np.minimum(ref.tree.query_ball_point(centroids, cfg.radius, return_length=True),
                                  cfg.max_neighbors) for ref in refs], 1).astype(np.float64)  # (V, W)
    total = counts.sum(1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1) / np.log(len(refs))
    return np.where(total[:, 0] > 0, h, 1.0)[back.ravel()]


def moving_mask(h: np.ndarray, cfg: MotionConfig) -> np.ndarray:
    return h < cfg.moving_entropy
