"""The vision tagging model (VTM) of the procedural world: image -> objects, attributes, relations.

A nearest-template tagger fit on rendered scene records, not a neural network: pixels are assigned to the nearest
palette colour, each connected region of an object colour is one object, and its binary mask (a window centred on
the region) is matched by IoU against masks of every shape, size and rotation the world draws (the "training set":
`render` of one-object scene records). The best template gives shape and size, and the offset from the region's
box centre to the shape's centre, from which the spatial relations follow with the world's own rule. It reads the
world's images almost exactly and everything else not at all: spec 3.5's tagger stand-in for the closed loop. The
same tagger decomposes real images and judges synthetic ones (spec trap 4); its version is in the provenance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from raytrain.data import shapes
from raytrain.pipelines.ctrlsynth.tags import Tags

TAGGER_VERSION = "templates-1"
_WINDOW = 32  # pixels of the mask window at 64 px; larger shapes do not exist in the world


@dataclass
class TaggerConfig:
    image_size: int = 64  # images are resized to this side before tagging (the world's templates' size)
    min_pixels: int = 12  # colour regions smaller than this are edge noise, not objects
    min_iou: float = 0.5  # a region whose best template matches worse is not tagged (unknown object)
    rotation_step: float = 5.0  # degrees between template rotations over the world's [-20, 20]


class TemplateTagger:
    def __init__(self, cfg: TaggerConfig | None = None) -> None:
        self.cfg = cfg or TaggerConfig()
        self.palette_names = list(shapes.COLOURS)
        self.palette = np.array(list(shapes.COLOURS.values()), dtype=np.float32)
        self._templates()

    def _templates(self) -> None:
        """Binary masks of every (shape, size, rotation) drawn at the image centre, in a window around their box."""
        size, masks, meta = self.cfg.image_size, [], []
        steps = int(40 / self.cfg.rotation_step) + 1
        for shape in shapes.SHAPES:
            for size_name in shapes.SIZES:
                for rotation in np.linspace(-20, 20, steps):
                    obj = shapes.SceneObject(shape, "black", size_name, 0.5, 0.5, float(rotation))
                    image = np.asarray(shapes.render(shapes.Scene([obj], "white"), size))
                    mask = np.abs(image.astype(np.float32) - 245).sum(-1) > 3 * 112  # coverage above 1/2
                    window, centre = _window(mask)
                    masks.append(window.reshape(-1))
                    meta.append((shape, size_name, size / 2 - centre[0], size / 2 - centre[1]))
        self.templates = np.stack(masks).astype(np.float32)  # (T, W*W)
        self.template_area = self.templates.sum(1)
        self.meta = meta

    def tag_image(self, image: np.ndarray) -> Tags:
        """Tags of an RGB uint8 image (H, W, 3) of the configured size."""
        objects = self.detect(image)
        tags = Tags([o.shape for o in objects])
        for i, o in enumerate(objects):
            tags.attributes += [(i, o.size), (i, o.colour)]
        tags.relations = [(r.subject, r.predicate, r.object) for r in shapes.spatial_relations(objects)
                          if r.subject < r.object]
        return tags

    def tag(self, data: bytes) -> Tags:
        """Tags of an encoded image; raises on bytes that do not decode."""
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        side = self.cfg.image_size
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.LANCZOS)
        return self.tag_image(np.asarray(image))

    def detect(self, image: np.ndarray) -> list[shapes.SceneObject]:
        from scipy import ndimage

        pixels = image.astype(np.float32)
        background = _background(pixels)
        colours = np.concatenate([self.palette, background[None]])
        nearest = ((pixels[:, :, None, :] - colours) ** 2).sum(-1).argmin(-1)  # (H, W), len(palette) = background
        side = image.shape[0]
        found = []
        for c, name in enumerate(self.palette_names):
            regions, n = ndimage.label(nearest == c)
            for r in range(1, n + 1):
                mask = regions == r
                if mask.sum() < self.cfg.min_pixels:
                    continue
                window, centre = _window(mask)
                w = window.reshape(-1).astype(np.float32)
                inter = self.templates @ w
                iou = inter / (self.template_area + w.sum() - inter)
                best = int(iou.argmax())
                if iou[best] < self.cfg.min_iou:
                    continue
                shape, size_name, dx, dy = self.meta[best]
                found.append(shapes.SceneObject(shape, name, size_name, round((centre[0] + dx) / side, 4),
                                                round((centre[1] + dy) / side, 4)))
        return sorted(found, key=lambda o: (o.x, o.y))


def _background(pixels: np.ndarray) -> np.ndarray:
    """The commonest border colour."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    values, counts = np.unique(border.round().astype(np.int32), axis=0, return_counts=True)
    return values[counts.argmax()].astype(np.float32)


def _window(mask: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """A _WINDOW-square crop of `mask` centred on its bounding box, and that centre (x, y) in pixels."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    x0, y0 = int(round(cx)) - _WINDOW // 2, int(round(cy)) - _WINDOW // 2
    padded = np.pad(mask, _WINDOW)
    return padded[y0 + _WINDOW:y0 + 2 * _WINDOW, x0 + _WINDOW:x0 + 2 * _WINDOW], (cx, cy)
