"""Stage 6, multi-object tracking: a constant-velocity Kalman filter per track on the BEV median centre, with
greedy nearest-neighbour assignment (ViLGOD's tracker, spec stage 6).

A detection joins the nearest predicted track within `gate` metres; beyond the gate a pair is still accepted when the
centre distance is under `rescue_distance` and the point counts agree (ratio above `rescue_ratio`). A track survives
`max_missed` frames without a detection (the Kalman prediction bridges the gap); predicted-only frames at its end are
trimmed, and tracks with fewer than `min_len` detections are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raytrain.pipelines.autolabel.cluster import Detection
from raytrain.pipelines.autolabel.config import TrackConfig


@dataclass
class Track:
    track_id: int
    state: np.ndarray  # (4,) x, y, vx, vy
    cov: np.ndarray  # (4, 4)
    detections: dict[int, Detection] = field(default_factory=dict)  # frame index -> detection
    estimates: dict[int, np.ndarray] = field(default_factory=dict)  # frame index -> filtered (x, y)
    missed: int = 0
    last_size: int = 0

    @property
    def frames(self) -> list[int]:
        """Frames from the first to the last detection (bridged gaps included)."""
        detected = sorted(self.detections)
        return [f for f in sorted(self.estimates) if detected[0] <= f <= detected[-1]]


class KalmanTracker:
    def __init__(self, cfg: TrackConfig):
        self.cfg = cfg
        self.active: list[Track] = []
        self.finished: list[Track] = []
        self.next_id = 1
        self.last_time: float | None = None

    def _predict(self, track: Track, dt: float) -> None:
        F = np.eye(4)
        F[0, 2] = F[1, 3] = dt
        q = self.cfg.process_noise ** 2
        G = np.array([[dt ** 2 / 2, 0], [0, dt ** 2 / 2], [dt, 0], [0, dt]])
        track.state = F @ track.state
        track.cov = F @ track.cov @ F.T + q * G @ G.T

    def _update(self, track: Track, z: np.ndarray) -> None:
        H = np.eye(2, 4)
        S = H @ track.cov @ H.T + self.cfg.measurement_noise ** 2 * np.eye(2)
        K = track.cov @ H.T @ np.linalg.inv(S)
        track.state = track.state + K @ (z - H @ track.state)
        track.cov = (np.eye(4) - K @ H) @ track.cov

    def step(self, frame: int, time: float, detections: list[Detection]) -> None:
        """Advance to `frame` (at `time` seconds) and assign its detections."""
        dt = 0.1 if self.last_time is None else max(time - self.last_time, 1e-3)
        self.last_time = time
        for t in self.active:
            self._predict(t, dt)
        centres = np.array([d.centre for d in detections]).reshape(-1, 2)
        pairs = []
        for ti, t in enumerate(self.active):
            dist = np.linalg.norm(centres - t.state[:2], axis=1)
            for di in np.flatnonzero(dist < self.cfg.rescue_distance):
                ratio = min(t.last_size, detections[di].size) / max(t.last_size, detections[di].size, 1)
                if dist[di] < self.cfg.gate or ratio > self.cfg.rescue_ratio:
                    pairs.append((dist[di], ti, di))
        used_t, used_d = set(), set()
        for _, ti, di in sorted(pairs):
            if ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            self._assign(self.active[ti], frame, detections[di])
        for ti, t in enumerate(self.active):
            if ti not in used_t:
                t.missed += 1
                t.estimates[frame] = t.state[:2].copy()
        for di, d in enumerate(detections):
            if di not in used_d:
                cov = np.diag([self.cfg.measurement_noise ** 2] * 2 + [25.0, 25.0])  # unknown velocity, ~5 m/s
                t = Track(self.next_id, np.append(d.centre, [0.0, 0.0]), cov)
                self.next_id += 1
                self._assign(t, frame, d, update=False)
                self.active.append(t)
        self.finished += [t for t in self.active if t.missed > self.cfg.max_missed]
        self.active = [t for t in self.active if t.missed <= self.cfg.max_missed]

    def _assign(self, track: Track, frame: int, det: Detection, update: bool = True) -> None:
        if update:
            self._update(track, det.centre)
        track.missed = 0
        track.last_size = det.size
        track.detections[frame] = det
        track.estimates[frame] = track.state[:2].copy()
        det.track_id = track.track_id

    def tracks(self) -> list[Track]:
        """All tracks with at least `min_len` detections, renumbered 1.. in order of their first frame."""
        kept = [t for t in self.finished + self.active if len(t.detections) >= self.cfg.min_len]
        kept.sort(key=lambda t: (min(t.detections), t.track_id))
        for i, t in enumerate(kept, 1):
            t.track_id = i
            for d in t.detections.values():
                d.track_id = i
        return kept
