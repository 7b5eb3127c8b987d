"""Stage 7, amodal boxes along each track (ViLGOD's rules, spec stage 7), in the world frame.

Moving tracks: a heading per frame from the displacement of the filtered centre over up to `heading_frames`
frames (at least `min_displacement` metres, else the nearest frame's heading), a heading-aligned extent box per
frame, one track size (the median of the `moving_topk` frames with the most points), and each frame's box re-anchored
at the visible corner nearest the ego so the seen corner stays put while the hidden sides are completed. A "moving"
track whose extent boxes all overlap its largest one never went anywhere and becomes static. Static tracks: the
points of the `static_topk` densest frames accumulated (the object does not move in the world frame), yaw by voting
the single-frame minimum-area rectangles' yaws into bins, one extent box for every frame, rejected outside the size
limits. Box bottoms sit on the ground plane. Finally l and w grow by `margin_lw`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raytrain.pipelines.autolabel.config import BoxConfig
from raytrain.pipelines.autolabel.geometry import bev_intersection, extent_box, min_area_rect
from raytrain.pipelines.autolabel.track import Track


@dataclass
class TrackBoxes:
    moving: bool
    boxes: dict[int, np.ndarray]  # frame -> (7,) world box


def fit_single(xyz: np.ndarray, cfg: BoxConfig) -> np.ndarray:
    """Single-frame box: minimum-area BEV rectangle, height = z-extent + `margin_h` (no l/w margin)."""
    cx, cy, l, w, yaw = min_area_rect(xyz[:, :2])
    z0, z1 = xyz[:, 2].min(), xyz[:, 2].max()
    return np.array([cx, cy, (z0 + z1) / 2, l, w, z1 - z0 + cfg.margin_h, yaw])


def headings(track: Track, cfg: BoxConfig) -> dict[int, float] | None:
    """Per-frame heading of a moving track, or None when it never moves `min_displacement` metres."""
    frames = track.frames
    half = max(1, cfg.heading_frames // 2)
    found: dict[int, float] = {}
    for i, f in enumerate(frames):
        a, b = frames[max(0, i - half)], frames[min(len(frames) - 1, i + half)]
        d = track.estimates[b] - track.estimates[a]
        if np.hypot(*d) >= cfg.min_displacement:
            found[f] = float(np.arctan2(d[1], d[0]))
    if not found:
        return None
    known = np.array(sorted(found))
    return {f: found[int(known[np.abs(known - f).argmin()])] for f in frames}


def _anchored(ext: np.ndarray, yaw: float, size: np.ndarray, ego_xy: np.ndarray) -> np.ndarray:
    """BEV centre of a box of `size` (l, w) sharing the extent box's corner nearest the ego."""
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, -s], [s, c]])
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])
    corners = ext[:2] + (signs * ext[2:4] / 2) @ R.T
    k = np.linalg.norm(corners - ego_xy, axis=1).argmin()
    return corners[k] - R @ (signs[k] * size / 2)


def _all_overlap_largest(exts: dict[int, np.ndarray], yaws: dict[int, float]) -> bool:
    boxes = {f: np.array([e[0], e[1], 0, e[2], e[3], 1, yaws[f]]) for f, e in exts.items()}
    largest = max(boxes.values(), key=lambda b: b[3] * b[4])
    return all(bev_intersection(b, largest) > 0 for b in boxes.values())


def fit_moving(track: Track, yaws: dict[int, float], ego_xy: dict[int, np.ndarray], cfg: BoxConfig) -> TrackBoxes:
    dets = track.detections
    exts = {f: extent_box(d.xyz[:, :2], yaws[f]) for f, d in dets.items()}
    if _all_overlap_largest(exts, yaws):
        return fit_static(track, cfg)
    densest = sorted(dets, key=lambda f: -dets[f].size)[:cfg.moving_topk]
    size = np.median([exts[f][2:4] for f in densest], axis=0)
    height = float(np.median([dets[f].xyz[:, 2].max() - dets[f].floor for f in densest]))
    floors = np.array([dets[f].floor for f in sorted(dets)])
    boxes = {}
    for f in track.frames:
        if f in dets:
            centre = _anchored(exts[f], yaws[f], size, ego_xy[f])
        else:
            centre = track.estimates[f]
        floor = float(np.interp(f, sorted(dets), floors))
        boxes[f] = np.array([*centre, floor + height / 2, size[0] + cfg.margin_lw, size[1] + cfg.margin_lw,
                             height, yaws[f]])
    return TrackBoxes(True, boxes)


def vote_yaw(yaws: np.ndarray, bins: int) -> float:
    """Most voted yaw modulo pi: the circular mean (in doubled-angle space) of the winning bin's votes."""
    yaws = np.mod(yaws, np.pi)
    idx = np.minimum((yaws / np.pi * bins).astype(int), bins - 1)
    win = np.bincount(idx, minlength=bins).argmax()
    votes = yaws[idx == win]
    return float(np.mod(np.arctan2(np.sin(2 * votes).mean(), np.cos(2 * votes).mean()) / 2, np.pi))


def fit_static(track: Track, cfg: BoxConfig) -> TrackBoxes | None:
    dets = track.detections
    densest = sorted(dets, key=lambda f: -dets[f].size)[:cfg.static_topk]
    xyz = np.concatenate([dets[f].xyz for f in densest])
    yaw = vote_yaw(np.array([fit_single(dets[f].xyz, cfg)[6] for f in densest]), cfg.yaw_bins)
    cx, cy, l, w = extent_box(xyz[:, :2], yaw)
    floor = float(np.median([dets[f].floor for f in densest]))
    h = xyz[:, 2].max() - floor
    if not (np.all(np.array([l, w, h]) >= cfg.static_min) and np.all(np.array([l, w, h]) <= cfg.static_max)):
        return None
    box = np.array([cx, cy, floor + h / 2, l + cfg.margin_lw, w + cfg.margin_lw, h, yaw])
    return TrackBoxes(False, {f: box for f in track.frames})


def fit_track(track: Track, moving: bool, ego_xy: dict[int, np.ndarray], cfg: BoxConfig) -> TrackBoxes | None:
    """Amodal boxes for every frame of the track, or None when a static fit falls outside the size limits."""
    yaws = headings(track, cfg) if moving else None
    if yaws is None:
        return fit_static(track, cfg)
    return fit_moving(track, yaws, ego_xy, cfg)
