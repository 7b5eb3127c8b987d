"""Image-text training pairs from labelled LiDAR sequences: camera crops around object points, captioned by class.

The image-text model of auto-labeling sees, for each feature-map cell, a `crop`-pixel square of a camera image
(`vlm.feature_map`). The pairs written here are the same kind of square: centred on the projection of a LiDAR point
that hit a ground-truth object and passed the depth test, captioned with the object's class name; squares centred on
ground points are captioned "road". Written as webdataset tar shards (`imagetext.write_shard`, one per sequence), so
`raytrain train job=clip data=imagetext data.path=SHARDS` trains the CLIP model the `clip` VLM backend loads.
Ground truth is only used to caption training pairs for the image-text model, never by the auto-labeler itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raytrain.data.imagetext import write_shard
from raytrain.data.lidar import Sequence, find_sequences
from raytrain.data.shapes import png_bytes
from raytrain.pipelines.autolabel.config import ProjectionConfig
from raytrain.pipelines.autolabel.project import visible_in

GROUND_CAPTION = "road"


@dataclass
class CropConfig:
    crop: int = 16  # pixels, side of each square (match vlm.crop)
    per_object: int = 2  # squares per visible object, camera and frame
    ground: int = 2  # "road" squares per camera and frame
    frame_step: int = 2  # use every n-th frame
    seed: int = 0


def frame_crops(seq: Sequence, index: int, cfg: CropConfig, rng: np.random.Generator
                ) -> Iterator[tuple[np.ndarray, str]]:
    """(crop (S, S, 3) uint8, caption) pairs of one frame; frames without ground truth or points give none."""
    frame = seq.frame(index)
    if not frame.usable or frame.gt is None or frame.gt.point_ids is None:
        return
    xyz = frame.points[:, :3]
    names = dict(zip(frame.gt.track_ids.tolist(), frame.gt.classes.tolist()))
    half = cfg.crop // 2
    for cam in seq.cameras:
        image = frame.images.get(cam.name)
        if image is None:
            continue
        visible, uv = visible_in(cam, xyz, ProjectionConfig())
        px = np.floor(uv).astype(np.int64)
        inner = visible & (px[:, 0] >= half) & (px[:, 0] < cam.width - half) & (px[:, 1] >= half) \
            & (px[:, 1] < cam.height - half)
        for owner in np.unique(frame.gt.point_ids[inner]):
            idx = np.flatnonzero(inner & (frame.gt.point_ids == owner))
            caption = GROUND_CAPTION if owner == 0 else names.get(int(owner))
            if caption is None:
                continue
            for i in rng.choice(idx, min(len(idx), cfg.ground if owner == 0 else cfg.per_object), replace=False):
                u, v = px[i]
                yield image[v - half:v - half + cfg.crop, u - half:u - half + cfg.crop], caption


def write_crop_shards(data: str | Path, out: str | Path, cfg: CropConfig) -> dict[str, int]:
    """One shard of crops per sequence under `data` into `out`; returns counts (shards, samples, per caption)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    shards = 0
    for seq_root in find_sequences(data):
        seq = Sequence(seq_root)
        rng = np.random.default_rng([cfg.seed, shards])

        def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
            for index in range(0, seq.num_frames, cfg.frame_step):
                for k, (crop, caption) in enumerate(frame_crops(seq, index, cfg, rng)):
                    counts[caption] = counts.get(caption, 0) + 1
                    yield f"{seq.id}_{index:06d}_{k:05d}", {"png": png_bytes(Image.fromarray(crop)),
                                                              "txt": caption.encode()}

        write_shard(out / f"{seq.id}.tar", samples())
        shards += 1
    return {"shards": shards, "samples": sum(counts.values()), **{f"caption_{k}": v for k, v in sorted(counts.items())}}
