"""Stage 4, clustering: HDBSCAN (or DBSCAN) on voxel centroids of the non-ground points, then the spec's filters.

Clustering runs on 0.1 m voxel centroids and each point takes its voxel's cluster (spec trap 6: HDBSCAN on every
point is slow). A cluster survives if it has `min_points` points, a z-extent within `height`, its lowest point at
most `max_min_height` and its highest at least `min_max_height` above the ground plane (ViLGOD's required filters).
Clusters are first split where their points are more than `max_gap` apart (ours, [U]; see `split_at_gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.cluster import DBSCAN, HDBSCAN

from raytrain.pipelines.autolabel.config import ClusterConfig
from raytrain.pipelines.autolabel.motion import voxel_downsample


@dataclass
class Detection:
    """One filtered cluster of one frame, in the world frame."""
    frame: int
    xyz: np.ndarray  # (n, 3) world points
    floor: float  # world z of the ground plane below the cluster's centre
    moving_frac: float
    feature_sum: np.ndarray | None  # (D,) sum of the visible points' VL features
    n_visible: int
    track_id: int = -1

    @property
    def centre(self) -> np.ndarray:
        """BEV median centre, the tracker's measurement."""
        return np.median(self.xyz[:, :2], axis=0)

    @property
    def size(self) -> int:
        return len(self.xyz)

    def feature(self) -> np.ndarray | None:
        if self.feature_sum is None or self.n_visible == 0:
            return None
        return self.feature_sum / max(np.linalg.norm(self.feature_sum), 1e-8)


def cluster_points(xyz: np.ndarray, cfg: ClusterConfig) -> np.ndarray:
    """(N,) cluster label per point, -1 = noise."""
    if len(xyz) < cfg.min_points:
        return np.full(len(xyz), -1)
    centroids, voxel_of = voxel_downsample(xyz, cfg.voxel) if cfg.voxel > 0 else (xyz, np.arange(len(xyz)))
    if len(centroids) < 2:
        return np.full(len(xyz), -1)
    if cfg.method == "hdbscan":
        algo = HDBSCAN(min_cluster_size=max(2, min(cfg.min_cluster_size, len(centroids))),
                       cluster_selection_epsilon=cfg.epsilon, copy=True)
    else:
        algo = DBSCAN(eps=max(cfg.epsilon, 1.5 * cfg.voxel), min_samples=3)
    labels = algo.fit_predict(centroids)
    if cfg.max_gap > 0:
        labels = split_at_gaps(centroids, labels, cfg.max_gap)
    return labels[voxel_of]


def split_at_gaps(xyz: np.ndarray, labels: np.ndarray, max_gap: float) -> np.ndarray:
    """Relabel so that every cluster is connected with links of at most `max_gap` metres.

    HDBSCAN links sparse far-away points across gaps wider than the space between two objects; an object's own
    samples are never that far apart.
    """
    out = np.full(len(labels), -1)
    next_label = 0
    for idx in clusters(labels):
        pairs = cKDTree(xyz[idx]).query_pairs(max_gap, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(idx), len(idx)))
        n, parts = connected_components(graph, directed=False)
        out[idx] = parts + next_label
        next_label += n
    return out


def keep_cluster(height: np.ndarray, z: np.ndarray, cfg: ClusterConfig) -> bool:
    """The spec's required filters, with `height` above the ground plane and `z` the points' z."""
    extent = z.max() - z.min()
    return (len(z) >= cfg.min_points and cfg.height[0] <= extent <= cfg.height[1]
            and height.min() <= cfg.max_min_height and height.max() >= cfg.min_max_height)


def clusters(labels: np.ndarray) -> list[np.ndarray]:
    """Point indices of each cluster, in label order."""
    order = np.argsort(labels, kind="stable")
    ids, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return [g for i, g in zip(ids, groups) if i >= 0]
