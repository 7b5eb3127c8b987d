"""A neural vision tagging model of the procedural world, trained on its scene records (`synth.tagger.kind=neural`).

The template tagger finds objects as colour regions and reads each by matching its mask against drawn templates;
this one reads each region with a network trained on scene records instead. `RegionNet`, a small convolutional
network, takes a region's 32-pixel mask window (`tagger.region_window`) and predicts the object's shape, its size and
the offset from the window's centre to the object's centre (a crescent's pixels lie well off its centre, and the
relations follow from centres). Training samples come from scene records alone (`region_samples`): each scene is
rendered, its colour regions found exactly as when reading, and each region labelled with the record's object it
covers most. Colour is the region's palette colour; relations follow from the centres by the world's rule.

    python -m raytrain.pipelines.ctrlsynth.neural_tagger --out outputs/tagger --scenes 4000 --steps 2000

writes `tagger.safetensors` and `tagger.json` (architecture, training settings, held-out exact-read rate) into
`--out`, each atomically; `synth.tagger.kind=neural synth.tagger.checkpoint=outputs/tagger` uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytrain.config import RaytrainError
from raytrain.data import shapes
from raytrain.pipelines.common import write_bytes, write_json
from raytrain.pipelines.ctrlsynth.tagger import (TaggerConfig, colour_regions, object_mask, read_image, region_window,
                                                 scene_tags, tags_of)
from raytrain.pipelines.ctrlsynth.tags import Tags

WEIGHTS, META = "tagger.safetensors", "tagger.json"
N_SHAPES, N_SIZES = len(shapes.SHAPES), len(shapes.SIZES)
NO_OBJECT = N_SHAPES  # the shape class of a region that is no object


class RegionNet(nn.Module):
    """(B, 1, 32, 32) mask windows -> shape logits (B, shapes + 1; the last: no object, an anti-aliased fringe of
    another colour), size logits (B, sizes) and the object's centre minus the window's, (B, 2), in fractions of the
    image side."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 x 4
            nn.Flatten(), nn.Linear(16 * 4 * width, 4 * width), nn.ReLU())
        self.head = nn.Linear(4 * width, N_SHAPES + 1 + N_SIZES + 2)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.body(windows))
        return out[:, :N_SHAPES + 1], out[:, N_SHAPES + 1:N_SHAPES + 1 + N_SIZES], out[:, -2:]


def region_samples(scene: shapes.Scene, side: int, min_pixels: int) -> list[tuple[np.ndarray, int, int, np.ndarray]]:
    """A scene record's training samples: for each colour region of its image (found as when reading), the mask
    window and the shape index, size index and centre offset of the object of its colour it overlaps most; a region
    of no object's colour (an anti-aliased edge, e.g. pink pixels between red and white) is shape NO_OBJECT."""
    image = np.asarray(shapes.render(scene, side))
    masks = [object_mask(o, side) for o in scene.objects]
    samples = []
    for colour, region in colour_regions(image, min_pixels):
        overlaps = [(region & m).sum() if o.colour == colour else 0 for o, m in zip(scene.objects, masks)]
        window, (cx, cy) = region_window(region)
        if not overlaps or max(overlaps) == 0:
            samples.append((window, NO_OBJECT, 0, np.zeros(2, np.float32)))
            continue
        o = scene.objects[int(np.argmax(overlaps))]
        offset = np.array([o.x - cx / side, o.y - cy / side], np.float32)
        samples.append((window, shapes.SHAPES.index(o.shape), list(shapes.SIZES).index(o.size), offset))
    return samples


def sample_tensors(scenes: list[shapes.Scene], side: int, min_pixels: int) -> dict[str, torch.Tensor]:
    samples = [s for scene in scenes for s in region_samples(scene, side, min_pixels)]
    return {"windows": torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.float32))[:, None],
            "shape": torch.tensor([s[1] for s in samples]), "size": torch.tensor([s[2] for s in samples]),
            "offset": torch.from_numpy(np.stack([s[3] for s in samples]))}


def loss_of(net: RegionNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shape cross-entropy; for objects also size cross-entropy and the centre offset's L1 in pixels of a 64-pixel
    image."""
    shape, size, offset = net(batch["windows"])
    loss = F.cross_entropy(shape, batch["shape"])
    real = batch["shape"] != NO_OBJECT
    if real.any():
        loss = loss + F.cross_entropy(size[real], batch["size"][real])
        loss = loss + 64 * (offset[real] - batch["offset"][real]).abs().mean()
    return loss


class NeuralTagger:
    """Tags of the world's images: colour regions read by a trained `RegionNet`."""

    def __init__(self, net: nn.Module, cfg: TaggerConfig | None = None, version: str = "neural-1") -> None:
        self.net = net.eval()
        self.cfg = cfg or TaggerConfig()
        self.version = version

    @classmethod
    def load(cls, cfg: TaggerConfig) -> NeuralTagger:
        root = Path(cfg.checkpoint)
        for name in (WEIGHTS, META):
            if not (root / name).is_file():
                raise RaytrainError(f"synth.tagger.checkpoint={cfg.checkpoint}: no {name} there (write one with "
                                    "`python -m raytrain.pipelines.ctrlsynth.neural_tagger --out DIR`)")
        from safetensors.torch import load_file

        meta = json.loads((root / META).read_text())
        net = RegionNet(meta["width"])
        net.load_state_dict(load_file(str(root / WEIGHTS)))
        return cls(net, cfg, f"neural-1:{meta['weights_sha256'][:12]}")

    def tag(self, data: bytes) -> Tags:
        """Tags of an encoded image; raises on bytes that do not decode."""
        return self.tag_image(read_image(data, self.cfg.image_size))

    def tag_image(self, image: np.ndarray) -> Tags:
        """Tags of an RGB uint8 image (H, W, 3) of the configured size."""
        return tags_of(self.detect(image))

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[shapes.SceneObject]:
        regions = colour_regions(image, self.cfg.min_pixels)
        if not regions:
            return []
        side = image.shape[0]
        windows = [region_window(mask) for _, mask in regions]
        batch = torch.from_numpy(np.stack([w for w, _ in windows]).astype(np.float32))[:, None]
        shape, size, offset = self.net(batch)
        found = []
        for (colour, _), (_, (cx, cy)), s, z, (dx, dy) in zip(regions, windows, shape.argmax(1).tolist(),
                                                             size.argmax(1).tolist(), offset.tolist()):
            if s == NO_OBJECT:
                continue
            x, y = min(max(cx / side + dx, 0.0), 1.0), min(max(cy / side + dy, 0.0), 1.0)
            found.append(shapes.SceneObject(shapes.SHAPES[s], colour, list(shapes.SIZES)[z], round(x, 4),
                                            round(y, 4)))
        return sorted(found, key=lambda o: (o.x, o.y))


def exact_reads(tagger: Any, scenes: list[shapes.Scene], side: int) -> float:
    """Share of scenes whose objects, attributes and relations the tagger reads exactly."""
    exact = 0
    for scene in scenes:
        found, truth = tagger.tag_image(np.asarray(shapes.render(scene, side))), scene_tags(scene)
        exact += all(found.keys(k) == truth.keys(k) for k in ("object", "attribute", "relation"))
    return exact / len(scenes)


def train_tagger(out: str | Path, scenes: int = 4000, steps: int = 2000, batch: int = 64, lr: float = 2e-3,
                 width: int = 32, heldout: int = 200, seed: int = 0, side: int = 64) -> dict[str, Any]:
    """Train a `RegionNet` on the regions of `scenes` generated scene records (seed `seed`), measure the tagger's
    exact-read rate on `heldout` scenes of another seed, and write it to `out`. Returns the metadata written beside
    the weights."""
    from safetensors.torch import save

    torch.manual_seed(seed)
    world, cfg = shapes.WorldConfig(image_size=side), TaggerConfig(image_size=side)
    train = [shapes.generate_scene(shapes.sample_rng(seed, i), world) for i in range(scenes)]
    held = [shapes.generate_scene(shapes.sample_rng(seed + 1, i), world) for i in range(heldout)]
    data = sample_tensors(train, side, cfg.min_pixels)
    n = len(data["shape"])
    net = RegionNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    order, rng, start, losses = [], random.Random(seed), time.perf_counter(), []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(n), n)
        rows, order = order[:batch], order[batch:]
        loss = loss_of(net, {k: v[rows] for k, v in data.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    out = Path(out)
    weights = save({k: v.contiguous() for k, v in net.state_dict().items()})
    write_bytes(out / WEIGHTS, weights)
    meta = {"width": width, "scenes": scenes, "regions": n, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "side": side, "train_seconds": seconds, "final_loss": float(np.mean(losses[-50:])),
            "weights_sha256": hashlib.sha256(weights).hexdigest(), "heldout_scenes": heldout,
            "heldout_exact_read": exact_reads(NeuralTagger(net, cfg), held, side)}
    write_json(out / META, meta)
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description="Train the procedural world's neural tagger on its scene records.")
    p.add_argument("--out", required=True, help="directory for tagger.safetensors and tagger.json")
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="channels of the first convolution (doubling after)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = train_tagger(args.out, args.scenes, args.steps, args.batch, args.lr, args.width, args.heldout, args.seed)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
