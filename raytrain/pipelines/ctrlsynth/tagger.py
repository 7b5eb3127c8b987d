"""The vision tagging model (VTM) of the procedural world: image -> objects, attributes, relations.

A nearest-template tagger fit on rendered scene records, not a neural network: pixels are assigned to the nearest
palette colour, each connected region of an object colour is one object, and its binary mask (a window centred on
the region) is matched by IoU against masks of every shape, size and rotation the world draws (the "training set":
`render` of one-object scene records). The best template gives shape and size, and the offset from the region's
box centre to the shape's centre, from which the spatial relations follow with the world's own rule. It reads the
world's images almost exactly and everything else not at all: spec 3.5's tagger stand-in for the closed loop. The
same tagger decomposes real images and judges synthetic ones (spec trap 4); its version is in the provenance.
`synth.tagger.kind=neural` swaps in a network trained on scene records (`neural_tagger.py`), which reads the same
colour regions (`colour_regions`); `synth.tagger.kind=catlip` adds the project's CatLIP classifier to either region
tagger (`catlip_tagger.py`: union of their objects).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from raytrain.data import shapes
from raytrain.pipelines.ctrlsynth.tags import Tags

TAGGER_VERSION = "templates-1"
_WINDOW = 32  # pixels of the mask window at 64 px; larger shapes do not exist in the world


REGION_KINDS = ("templates", "neural")


@dataclass
class CatlipTaggerConfig:
    """The CatLIP multi-label classifier of `kind=catlip` (spec 3.2: top-20 classes with score >= 0.3)."""

    checkpoint: str | None = None  # a CatLIP run (`raytrain train job=catlip`) or one of its checkpoints
    top_k: int = 20  # at most this many classes, highest sigmoid scores first
    threshold: float = 0.3  # and only those scoring at least this

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"synth.tagger.catlip.threshold={self.threshold}; a sigmoid score lies in [0, 1]")
        if self.top_k < 1:
            raise ValueError(f"synth.tagger.catlip.top_k={self.top_k}; expected at least 1")


@dataclass
class TaggerConfig:
    kind: str = "templates"  # templates (this module) | neural (`neural_tagger.py`, trained on scene records)
    # | catlip (the `region` tagger's tags united with CatLIP's classes, `catlip_tagger.py`)
    region: str = "templates"  # kind=catlip: the region tagger, templates | neural (neural uses `checkpoint`)
    checkpoint: str | None = None  # neural: the --out of `python -m raytrain.pipelines.ctrlsynth.neural_tagger`
    image_size: int = 64  # images are resized to this side before tagging (the world's templates' size)
    min_pixels: int = 12  # colour regions smaller than this are edge noise, not objects
    min_iou: float = 0.5  # a region whose best template matches worse is not tagged (unknown object)
    rotation_step: float = 5.0  # degrees between template rotations over the world's [-20, 20]
    catlip: CatlipTaggerConfig = field(default_factory=CatlipTaggerConfig)

    def __post_init__(self) -> None:
        if self.kind not in (*REGION_KINDS, "catlip"):
            raise ValueError(f"synth.tagger.kind={self.kind!r}; expected templates, neural or catlip")
        if self.region not in REGION_KINDS:
            raise ValueError(f"synth.tagger.region={self.region!r}; expected templates or neural")
        if self.region_kind == "neural" and not self.checkpoint:
            key = "region" if self.kind == "catlip" else "kind"
            raise ValueError(f"synth.tagger.{key}=neural needs synth.tagger.checkpoint (train one with "
                             "`python -m raytrain.pipelines.ctrlsynth.neural_tagger --out DIR`)")
        if self.kind == "catlip" and not self.catlip.checkpoint:
            raise ValueError("synth.tagger.kind=catlip needs synth.tagger.catlip.checkpoint (a CatLIP run: "
                             "`raytrain train job=catlip`)")

    @property
    def region_kind(self) -> str:
        """The tagger that reads objects from colour regions: `kind` itself, or `region` under kind=catlip."""
        return self.region if self.kind == "catlip" else self.kind


class Tagger(Protocol):
    """What the pipeline asks of a vision tagging model."""

    version: str

    def tag(self, data: bytes) -> Tags: ...

    def tag_image(self, image: np.ndarray) -> Tags: ...


def build_tagger(cfg: TaggerConfig) -> Tagger:
    """The configured tagger (`kind`)."""
    if cfg.kind == "catlip":
        from raytrain.pipelines.ctrlsynth.catlip_tagger import CatlipTagger

        return CatlipTagger.load(cfg)
    return build_region_tagger(cfg)


def build_region_tagger(cfg: TaggerConfig) -> Tagger:
    """The region tagger (`region_kind`): templates, or the neural one from `checkpoint`."""
    if cfg.region_kind == "neural":
        from raytrain.pipelines.ctrlsynth.neural_tagger import NeuralTagger

        return NeuralTagger.load(cfg)
    return TemplateTagger(cfg)


def read_image(data: bytes, side: int) -> np.ndarray:
    """An encoded image as RGB uint8 (side, side, 3); raises on bytes that do not decode."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def colour_regions(image: np.ndarray, min_pixels: int) -> list[tuple[str, np.ndarray]]:
    """(palette colour, boolean mask) of every connected region of one object colour of at least `min_pixels`
    pixels: pixels go to the nearest palette colour or the background (the commonest border colour)."""
    from scipy import ndimage

    pixels = image.astype(np.float32)
    palette = np.array(list(shapes.COLOURS.values()), dtype=np.float32)
    colours = np.concatenate([palette, _background(pixels)[None]])
    nearest = ((pixels[:, :, None, :] - colours) ** 2).sum(-1).argmin(-1)  # (H, W), len(palette) = background
    found = []
    for c, name in enumerate(shapes.COLOURS):
        regions, n = ndimage.label(nearest == c)
        masks = (regions == r for r in range(1, n + 1))
        found += [(name, mask) for mask in masks if mask.sum() >= min_pixels]
    return found


def object_mask(o: shapes.SceneObject, side: int) -> np.ndarray:
    """(side, side) bool: the pixels `o` covers by more than half (drawn alone, black on white)."""
    alone = shapes.SceneObject(o.shape, "black", o.size, o.x, o.y, o.rotation)
    image = np.asarray(shapes.render(shapes.Scene([alone], "white"), side)).astype(np.float32)
    return np.abs(image - 245).sum(-1) > 3 * 112


def scene_tags(scene: shapes.Scene) -> Tags:
    """The tags a scene record says its image shows: what a tagger should read from it."""
    return Tags([o.shape for o in scene.objects],
                [a for i, o in enumerate(scene.objects) for a in ((i, o.size), (i, o.colour))],
                [(r.subject, r.predicate, r.object) for r in scene.relations])


def tags_of(objects: list[shapes.SceneObject]) -> Tags:
    """Tags of objects read from an image: each one's shape, size and colour; relations by the world's rule."""
    tags = Tags([o.shape for o in objects])
    for i, o in enumerate(objects):
        tags.attributes += [(i, o.size), (i, o.colour)]
    tags.relations = [(r.subject, r.predicate, r.object) for r in shapes.spatial_relations(objects)
                      if r.subject < r.object]
    return tags


class TemplateTagger:
    version = TAGGER_VERSION

    def __init__(self, cfg: TaggerConfig | None = None) -> None:
        self.cfg = cfg or TaggerConfig()
        self._templates()

    def _templates(self) -> None:
        """Binary masks of every (shape, size, rotation) drawn at the image centre, in a window around their box."""
        size, masks, meta = self.cfg.image_size, [], []
        steps = int(40 / self.cfg.rotation_step) + 1
        for shape in shapes.SHAPES:
            for size_name in shapes.SIZES:
                for rotation in np.linspace(-20, 20, steps):
                    obj = shapes.SceneObject(shape, "black", size_name, 0.5, 0.5, float(rotation))
                    window, centre = region_window(object_mask(obj, size))
                    masks.append(window.reshape(-1))
                    meta.append((shape, size_name, size / 2 - centre[0], size / 2 - centre[1]))
        self.templates = np.stack(masks).astype(np.float32)  # (T, W*W)
        self.template_area = self.templates.sum(1)
        self.meta = meta

    def tag_image(self, image: np.ndarray) -> Tags:
        """Tags of an RGB uint8 image (H, W, 3) of the configured size."""
        return tags_of(self.detect(image))

    def tag(self, data: bytes) -> Tags:
        """Tags of an encoded image; raises on bytes that do not decode."""
        return self.tag_image(read_image(data, self.cfg.image_size))

    def detect(self, image: np.ndarray) -> list[shapes.SceneObject]:
        side, found = image.shape[0], []
        for name, mask in colour_regions(image, self.cfg.min_pixels):
            window, centre = region_window(mask)
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


def region_window(mask: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """A _WINDOW-square crop of `mask` centred on its bounding box, and that centre (x, y) in pixels."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    x0, y0 = int(round(cx)) - _WINDOW // 2, int(round(cy)) - _WINDOW // 2
    padded = np.pad(mask, _WINDOW)
    return padded[y0 + _WINDOW:y0 + 2 * _WINDOW, x0 + _WINDOW:x0 + 2 * _WINDOW], (cx, cy)
