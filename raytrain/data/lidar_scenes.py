"""Synthetic driving scenes: posed LiDAR sweeps, camera images and ground truth, written in the `lidar.py` format.

A scene is a sloped, noisy ground plane with a road along the world x axis; an ego vehicle drives along it (optionally
turning). Objects of six classes stand at class-typical places: cars and trucks in lanes (moving) or parked (static),
cyclists near the lane edge, pedestrians on the sidewalks (walking or standing), trees and poles beyond them (static
background clutter that looks like an object to geometry alone). Each object is a union of class-shaped parts (a car
is a body plus a cabin, a tree a trunk plus a canopy) with class-typical sizes, moving at constant velocity or along
a turn. LiDAR is a spinning sensor ray-cast against the scene (beams x azimuth steps, so occlusion is physical) with
range noise and random dropout; cameras are pinhole, ray-cast the same scene, and colour each hit by its class look
(`LOOKS`: distinct colours per class and part, jittered per instance, plus pixel noise). Ground truth is each
object's amodal box in the vehicle frame, its track id, class, speed and number of LiDAR points, plus the track id
every LiDAR point hit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raytrain.data.lidar import Camera, Frame, GroundTruth, transform_boxes, wrap_angle, write_frame, write_meta

PARTICIPANTS = ("car", "truck", "pedestrian", "cyclist")
BACKGROUND = ("road", "tree", "pole", "sky")


@dataclass(frozen=True)
class Part:
    centre: tuple[float, float, float]  # as fractions of the object's (l, w, h), from its box centre
    size: tuple[float, float, float]  # as fractions of (l, w, h)
    colour: tuple[float, float, float]  # RGB in [0, 1]


@dataclass(frozen=True)
class ObjectClass:
    size: tuple[float, float, float]  # mean l, w, h in metres
    parts: tuple[Part, ...]
    reflectance: float  # LiDAR intensity


CLASSES: dict[str, ObjectClass] = {
    "car": ObjectClass((4.5, 1.9, 1.6), (Part((0, 0, -0.2), (1, 1, 0.6), (0.85, 0.1, 0.1)),
                                         Part((-0.05, 0, 0.3), (0.55, 0.9, 0.4), (0.15, 0.15, 0.3))), 0.6),
    "truck": ObjectClass((7.5, 2.5, 3.2), (Part((0.4, 0, -0.1), (0.2, 1, 0.8), (0.95, 0.5, 0.05)),
                                           Part((-0.1, 0, 0.0), (0.8, 1, 1), (0.1, 0.55, 0.55))), 0.7),
    "pedestrian": ObjectClass((0.6, 0.6, 1.75), (Part((0, 0, -0.25), (0.6, 0.7, 0.5), (0.1, 0.1, 0.15)),
                                                 Part((0, 0, 0.25), (1, 1, 0.5), (0.1, 0.35, 0.95))), 0.3),
    "cyclist": ObjectClass((1.8, 0.6, 1.7), (Part((0, 0, -0.25), (1, 0.4, 0.5), (0.05, 0.05, 0.05)),
                                             Part((0, 0, 0.25), (0.35, 1, 0.5), (0.95, 0.85, 0.1))), 0.4),
    "tree": ObjectClass((1.6, 1.6, 5.0), (Part((0, 0, -0.3), (0.2, 0.2, 0.4), (0.45, 0.28, 0.1)),
                                          Part((0, 0, 0.2), (1, 1, 0.6), (0.15, 0.6, 0.15))), 0.2),
    "pole": ObjectClass((0.3, 0.3, 3.5), (Part((0, 0, 0), (1, 1, 1), (0.75, 0.75, 0.75)),), 0.9),
}
LOOKS = {name: tuple(p.colour for p in c.parts) for name, c in CLASSES.items()}
LOOKS.update(road=((0.3, 0.3, 0.32),), sky=((0.6, 0.78, 0.95),))


@dataclass
class Placement:
    """How many objects of a class stand in a row across the road, and how they move."""
    cls: str
    count: int
    lateral: tuple[float, ...]  # candidate y positions (world)
    speed: tuple[float, float] = (0.0, 0.0)  # m/s range; 0 = static
    turn: float = 0.0  # probability of a constant yaw rate (a turn) instead of a straight line


@dataclass
class SceneConfig:
    frames: int = 40
    frame_dt: float = 0.1
    range_x: tuple[float, float] = (-25.0, 60.0)  # where objects start along the road (world x)
    ego_speed: tuple[float, float] = (4.0, 8.0)
    ego_yaw_rate: float = 0.03  # max |rad/s|
    slope: float = 0.02  # max |dz/dx|, |dz/dy| of the ground plane
    ground_noise: float = 0.02  # m
    beams: int = 32
    elevation: tuple[float, float] = (-22.0, 10.0)  # degrees
    azimuth_step: float = 0.2  # degrees
    max_range: float = 75.0
    range_noise: float = 0.02  # m
    dropout: float = 0.05  # fraction of returns lost
    sensor_height: float = 1.8
    image_size: tuple[int, int] = (160, 96)  # width, height
    camera_yaws: tuple[float, ...] = (0.0, 60.0, -60.0)  # degrees; 3 x 70 degree FOV cover the front 190 degrees
    camera_fov: float = 70.0
    pixel_noise: float = 0.03
    placements: list[Placement] = field(default_factory=lambda: [
        Placement("car", 3, (-3.5, 3.5), (5.0, 11.0), 0.2),
        Placement("car", 4, (-7.0, 7.0)),
        Placement("truck", 1, (-3.5, 3.5), (5.0, 9.0)),
        Placement("truck", 1, (-7.5, 7.5)),
        Placement("cyclist", 2, (-5.2, 5.2), (3.0, 6.0), 0.3),
        Placement("cyclist", 1, (-9.5, 9.5)),
        Placement("pedestrian", 3, (-9.5, 9.5), (1.2, 1.8)),
        Placement("pedestrian", 3, (-9.5, 9.5)),
        Placement("tree", 4, (-12.5, 12.5)),
        Placement("pole", 3, (-10.8, 10.8)),
    ])


@dataclass
class SceneObject:
    track_id: int
    cls: str
    size: np.ndarray  # (3,) l, w, h
    start: np.ndarray  # (3,) box centre at t=0, world
    yaw: float
    speed: float
    yaw_rate: float
    colours: np.ndarray  # (parts, 3), jittered look

    def state(self, t: float) -> tuple[np.ndarray, float]:
        """Box centre and yaw at time t (constant speed along a straight line or a circular arc)."""
        if abs(self.yaw_rate) < 1e-9:
            d = self.speed * t * np.array([np.cos(self.yaw), np.sin(self.yaw), 0.0])
            return self.start + d, self.yaw
        yaw = self.yaw + self.yaw_rate * t
        r = self.speed / self.yaw_rate
        d = np.array([r * (np.sin(yaw) - np.sin(self.yaw)), -r * (np.cos(yaw) - np.cos(self.yaw)), 0.0])
        return self.start + d, yaw


class Scene:
    def __init__(self, cfg: SceneConfig, seed: int):
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.slope = rng.uniform(-cfg.slope, cfg.slope, 2)
        self.ego_speed = rng.uniform(*cfg.ego_speed)
        self.ego_yaw_rate = rng.uniform(-cfg.ego_yaw_rate, cfg.ego_yaw_rate)
        self.objects = self._place_objects(rng)

    def ground_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.slope[0] * x + self.slope[1] * y

    def _place_objects(self, rng: np.random.Generator) -> list[SceneObject]:
        objects: list[SceneObject] = []
        lane_speed: dict[float, float] = {}  # one speed per lane (+-3%), so followers never run into leaders
        for pl in self.cfg.placements:
            spec = CLASSES[pl.cls]
            for _ in range(pl.count):
                size = np.array(spec.size) * rng.uniform(0.92, 1.08, 3)
                y = float(rng.choice(pl.lateral))
                x = self._free_x(rng, objects, y, size[0])
                speed = 0.0
                if pl.speed[1] > 0:
                    speed = lane_speed.setdefault(y, rng.uniform(*pl.speed)) * rng.uniform(0.97, 1.03)
                yaw = (0.0 if y < 0 else np.pi) + rng.normal(0, 0.03)  # right-hand traffic
                yaw_rate = rng.choice([-1, 1]) * rng.uniform(0.1, 0.3) if speed and rng.random() < pl.turn else 0.0
                centre = np.array([x, y, self.ground_z(x, y) + size[2] / 2])
                colours = np.clip(np.array([p.colour for p in spec.parts])
                                  + rng.uniform(-0.07, 0.07, (len(spec.parts), 3)), 0, 1)
                objects.append(SceneObject(len(objects) + 1, pl.cls, size, centre, yaw, speed, yaw_rate, colours))
        return objects

    def _free_x(self, rng: np.random.Generator, placed: list[SceneObject], y: float, length: float) -> float:
        """A start x at least 3 m (bumper to bumper) from every object placed within 2.5 m laterally."""
        x = rng.uniform(*self.cfg.range_x)
        for _ in range(100):
            if all(abs(x - o.start[0]) > (length + o.size[0]) / 2 + 3.0
                   for o in placed if abs(o.start[1] - y) < 2.5):
                break
            x = rng.uniform(*self.cfg.range_x)
        return x

    def ego_pose(self, t: float) -> np.ndarray:
        """world_from_vehicle at time t: the ego drives from the origin along +x, turning at a constant rate."""
        w, v = self.ego_yaw_rate, self.ego_speed
        if abs(w) < 1e-9:
            x, y, yaw = v * t, 0.0, 0.0
        else:
            yaw = w * t
            x, y = v / w * np.sin(yaw), v / w * (1 - np.cos(yaw))
        T = np.eye(4)
        T[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
        T[:3, 3] = [x, y, self.ground_z(np.float64(x), np.float64(y))]
        return T

    def boxes(self, t: float) -> np.ndarray:
        """(M, 7) world boxes of all objects at time t."""
        rows = []
        for o in self.objects:
            c, yaw = o.state(t)
            c = c.copy()
            c[2] = self.ground_z(c[0], c[1]) + o.size[2] / 2
            rows.append([*c, *o.size, yaw])
        return np.asarray(rows, np.float64).reshape(-1, 7)

    def parts(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """World parts at the given object boxes: centres (P, 3), half sizes (P, 3), yaws (P,), object index, colour."""
        centres, halves, yaws, owner, colours = [], [], [], [], []
        for k, (o, box) in enumerate(zip(self.objects, boxes)):
            c, size, yaw = box[:3], box[3:6], box[6]
            R = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
            for part, colour in zip(CLASSES[o.cls].parts, o.colours):
                centres.append(c + R @ (np.array(part.centre) * size))
                halves.append(np.array(part.size) * size / 2)
                yaws.append(yaw)
                owner.append(k)
                colours.append(colour)
        return (np.asarray(centres).reshape(-1, 3), np.asarray(halves).reshape(-1, 3), np.asarray(yaws),
                np.asarray(owner, np.int64), np.asarray(colours).reshape(-1, 3))

    def cast(self, origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray,
             max_range: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ray-cast unit `dirs` (R, 3) from `origin` (3,): distance (inf = no hit), object index (-1 ground, -2
        nothing) and hit part index (-1 for ground/nothing)."""
        dist = np.full(len(dirs), np.inf)
        owner = np.full(len(dirs), -2, np.int64)
        part_of = np.full(len(dirs), -1, np.int64)
        denom = dirs[:, 2] - self.slope[0] * dirs[:, 0] - self.slope[1] * dirs[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_ground = (self.ground_z(origin[0], origin[1]) - origin[2]) / denom
        hit = (t_ground > 0) & (t_ground < max_range)
        dist[hit], owner[hit] = t_ground[hit], -1
        centres, halves, yaws, objs, _ = self.parts(boxes)
        azimuth = np.arctan2(dirs[:, 1], dirs[:, 0])
        order = np.argsort(azimuth)
        sorted_az = azimuth[order]
        for p in range(len(centres)):
            rays = order[_azimuth_window(sorted_az, centres[p] - origin, np.linalg.norm(halves[p]), max_range)]
            if len(rays) == 0:
                continue
            c, s = np.cos(yaws[p]), np.sin(yaws[p])
            Rt = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])  # world -> part
            o = Rt @ (origin - centres[p])
            d = dirs[rays] @ Rt.T
            d = np.where(np.abs(d) < 1e-12, 1e-12, d)
            t1, t2 = (-halves[p] - o) / d, (halves[p] - o) / d
            t_near = np.minimum(t1, t2).max(1)
            t_far = np.maximum(t1, t2).min(1)
            hit = (t_far >= t_near) & (t_near > 0) & (t_near < dist[rays])
            rays = rays[hit]
            dist[rays], owner[rays], part_of[rays] = t_near[hit], objs[p], p
        return dist, owner, part_of

    def lidar(self, pose: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sweep: (N, 4) vehicle-frame points with intensity, and the track id each point hit (0 = ground)."""
        cfg = self.cfg
        el = np.deg2rad(np.linspace(*cfg.elevation, cfg.beams))
        az = np.deg2rad(np.arange(0.0, 360.0, cfg.azimuth_step))
        el, az = np.meshgrid(el, az, indexing="ij")
        dirs_v = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
        origin_v = np.array([0.0, 0.0, cfg.sensor_height])
        origin = pose[:3, :3] @ origin_v + pose[:3, 3]
        dist, owner, _ = self.cast(origin, dirs_v @ pose[:3, :3].T, boxes, cfg.max_range)
        keep = np.isfinite(dist) & (self.rng.random(len(dist)) >= cfg.dropout)
        dist = dist[keep] + self.rng.normal(0, cfg.range_noise, keep.sum())
        owner = owner[keep]
        xyz = origin_v + dirs_v[keep] * dist[:, None]
        on_ground = owner == -1
        xyz[on_ground, 2] += self.rng.normal(0, cfg.ground_noise, on_ground.sum())
        refl = np.array([CLASSES[o.cls].reflectance for o in self.objects] + [0.1])[owner]  # owner -1 -> ground
        intensity = np.clip(refl + self.rng.normal(0, 0.05, len(refl)), 0, 1)
        track = np.where(on_ground, 0, np.array([o.track_id for o in self.objects] + [0])[owner])
        return np.column_stack([xyz, intensity]).astype(np.float32), track.astype(np.int32)

    def cameras(self) -> list[Camera]:
        cfg = self.cfg
        w, h = cfg.image_size
        f = w / 2 / np.tan(np.deg2rad(cfg.camera_fov) / 2)
        K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
        cams = []
        for yaw_deg in cfg.camera_yaws:
            yaw = np.deg2rad(yaw_deg)
            forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
            right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
            down = np.array([0.0, 0.0, -1.0])
            T = np.eye(4)
            T[:3, :3] = np.column_stack([right, down, forward])  # camera axes in the vehicle frame
            T[:3, 3] = [1.5 * np.cos(yaw), 1.5 * np.sin(yaw), 1.6]
            cams.append(Camera(f"cam{int(yaw_deg):+d}".replace("+", "p").replace("-", "m"), w, h, K, T))
        return cams

    def image(self, cam: Camera, pose: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        u, v = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
        rays_c = np.linalg.solve(cam.intrinsics, np.stack([u.ravel(), v.ravel(), np.ones(u.size)]))
        world_from_cam = pose @ cam.vehicle_from_camera
        dirs = (world_from_cam[:3, :3] @ rays_c).T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        _, owner, part = self.cast(world_from_cam[:3, 3], dirs, boxes, 120.0)
        colours = self.parts(boxes)[4]
        rgb = np.where((owner == -1)[:, None], LOOKS["road"][0], LOOKS["sky"][0])
        rgb[part >= 0] = colours[part[part >= 0]]
        rgb = rgb + self.rng.normal(0, self.cfg.pixel_noise, rgb.shape)
        return (np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(cam.height, cam.width, 3)

    def frame(self, i: int, cameras: list[Camera]) -> Frame:
        t = i * self.cfg.frame_dt
        pose, world = self.ego_pose(t), self.boxes(t)
        points, point_ids = self.lidar(pose, world)
        images = {cam.name: self.image(cam, pose, world) for cam in cameras}
        ids = np.array([o.track_id for o in self.objects], np.int32)
        gt = GroundTruth(boxes=transform_boxes(np.linalg.inv(pose), world).astype(np.float32), track_ids=ids,
                         classes=np.array([o.cls for o in self.objects]),
                         speeds=np.array([o.speed for o in self.objects], np.float32),
                         num_points=np.array([(point_ids == k).sum() for k in ids], np.int32), point_ids=point_ids)
        return Frame(i, t, points, pose, images, gt)


def _azimuth_window(sorted_az: np.ndarray, rel: np.ndarray, radius: float, max_range: float) -> np.ndarray:
    """Indices into `sorted_az` of the rays whose azimuth can reach a sphere of `radius` at offset `rel`."""
    dist = np.hypot(rel[0], rel[1])
    if dist <= radius:
        return np.arange(len(sorted_az))
    if dist - radius > max_range:
        return np.arange(0)
    centre, half = np.arctan2(rel[1], rel[0]), np.arcsin(radius / dist)
    lo, hi = centre - half, centre + half
    spans = [(lo, hi)] if -np.pi <= lo and hi <= np.pi else [(wrap_angle(lo), np.pi), (-np.pi, wrap_angle(hi))]
    return np.concatenate([np.arange(*np.searchsorted(sorted_az, span)) for span in spans])


def write_scene(root: Path, cfg: SceneConfig, seed: int) -> Path:
    """Generate one sequence (`seed` decides everything) into `root` and return it."""
    scene = Scene(cfg, seed)
    cameras = scene.cameras()
    for i in range(cfg.frames):
        write_frame(root, scene.frame(i, cameras))
    write_meta(root, root.name, cfg.frames, cfg.frame_dt, cameras)  # last: a sequence without meta is unfinished
    return root


def write_scenes(out: Path, n: int, cfg: SceneConfig, seed: int) -> list[Path]:
    """`n` sequences named seq_0000 ... under `out`; sequences already complete there are kept."""
    paths = []
    for k in range(n):
        root = out / f"seq_{k:04d}"
        paths.append(root if (root / "meta.json").exists() else write_scene(root, cfg, seed * 100_003 + k))
    return paths
