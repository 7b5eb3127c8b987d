"""Typed configs of the auto-labeling stages (conf/autolabel.yaml); defaults and tags follow spec autolabel3d.md.

[V] = ViLGOD's public value, [U] = unverified default (kept configurable), as in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GroundConfig:
    method: str = "ransac"  # the spec's fallback; Patchwork++ is not implemented
    min_range: float = 1.5  # m, points closer to the sensor are ignored [V]
    iterations: int = 100
    inlier_threshold: float = 0.15  # m, plane fit
    height: float = 0.15  # m above the fitted plane that still counts as ground
    max_tilt: float = 15.0  # degrees between the plane normal and the vehicle's z axis

    def __post_init__(self) -> None:
        if self.method != "ransac":
            raise ValueError(f"method={self.method!r}; only 'ransac' is implemented")


@dataclass
class MotionConfig:
    window: int = 15  # frames [V]
    radius: float = 0.3  # m [V]
    max_neighbors: int = 1000  # [V]
    moving_entropy: float = 0.6  # a point is moving if H < this [V]
    voxel: float = 0.1  # m, downsampling of the reference frames (spec trap 6)


@dataclass
class ProjectionConfig:
    depth_tol: float = 0.3  # m, a point is visible if within this of the nearest depth at its pixel [U]
    splat: int = 2  # pixels, radius of the z-buffer splat of each point (LiDAR is sparser than pixels)


@dataclass
class ClusterConfig:
    method: str = "hdbscan"  # [V]; "dbscan" is faster
    min_cluster_size: int = 15  # [V]
    epsilon: float = 0.15  # cluster_selection_epsilon (hdbscan) / eps (dbscan) [V]
    voxel: float = 0.1  # m, cluster voxel centres, then give each point its voxel's cluster (spec trap 6)
    max_gap: float = 1.0  # m, split clusters whose points are farther apart than this (0 = off) [U]
    min_points: int = 10  # [V]
    height: tuple[float, float] = (0.3, 6.0)  # z-extent range [V]
    max_min_height: float = 1.0  # lowest point at most this above the ground [V]
    min_max_height: float = 0.5  # highest point at least this above the ground [V]
    moving_frac: float = 0.5  # a cluster is moving if this share of its points moves [U]

    def __post_init__(self) -> None:
        if self.method not in ("hdbscan", "dbscan"):
            raise ValueError(f"method={self.method!r}; expected hdbscan or dbscan")


@dataclass
class TrackConfig:
    gate: float = 1.0  # m [V]
    rescue_distance: float = 5.0  # m, beyond the gate a pair is kept if the point counts agree [V]
    rescue_ratio: float = 0.7  # [V]
    max_missed: int = 3  # [V]
    min_len: int = 5  # [V]
    process_noise: float = 1.0  # Kalman acceleration noise, m/s^2
    measurement_noise: float = 0.2  # m


@dataclass
class BoxConfig:
    heading_frames: int = 10  # [V]
    min_displacement: float = 0.5  # m, for a heading [V]
    moving_topk: int = 3  # [V]
    static_topk: int = 10  # [V]
    margin_lw: float = 0.0  # m added to l and w; ViLGOD: 0.3 [V] (WOD boxes are looser than the point extent)
    margin_h: float = 0.3  # m added to the height of single-frame fits [V]
    static_max: tuple[float, float, float] = (20.0, 3.5, 4.0)  # l, w, h limits [V]
    static_min: tuple[float, float, float] = (0.2, 0.2, 0.5)  # [V]
    yaw_bins: int = 36  # static yaw voting


@dataclass
class LabelConfig:
    prompts: list[str] = field(default_factory=lambda: ["car", "truck", "pedestrian", "cyclist"])
    background: list[str] = field(default_factory=lambda: ["road", "tree", "pole", "building", "vegetation", "sky"])
    tau: float = 0.01  # softmax temperature [U]
    gate_margin: float = 0.0  # static gate: participant cosine must beat background by this [U]
    unknown_score: float = 0.3  # score of tracks with no camera coverage (kept as "unknown") [U]


@dataclass
class VLMConfig:
    """The image-text model. `backend` names an entry of `vlm.BACKENDS`; `look_prototypes` is the fallback."""
    backend: str = "look_prototypes"
    checkpoint: str | None = None  # weights of a trained backend (CatLIP); unused by the fallback
    crop: int = 16  # pixels, side of the crop around each feature-map cell
    stride: int = 4  # pixels between feature-map cells
    batch: int = 1024  # crops per encoder call
    device: str = "cpu"


@dataclass
class AutolabelConfig:
    mode: str = "full"  # full (UP-VL-like) | moving_only (the MI-UP-like baseline: no VL gate, no labels)
    crop: float = 75.0  # m, |x|, |y| limit in the vehicle frame [U]
    min_frames: int = 2
    ground: GroundConfig = field(default_factory=GroundConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    proj: ProjectionConfig = field(default_factory=ProjectionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    box: BoxConfig = field(default_factory=BoxConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    save_features: bool = True  # fp16 per-point features of visible non-ground points, for distillation

    def __post_init__(self) -> None:
        if self.mode not in ("full", "moving_only"):
            raise ValueError(f"mode={self.mode!r}; expected full or moving_only")
        if self.min_frames < 2:
            raise ValueError("min_frames must be >= 2: motion cues compare frames")
