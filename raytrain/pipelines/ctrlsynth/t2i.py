"""Text-to-image recomposition (spec 2.1 step 6) behind a replaceable interface.

No diffusion model is reachable offline, so the built-in backend is the procedural world's renderer driven by a
caption -> scene parser: the caption's objects, colours, sizes and relations (`tags.parse_caption`) become a scene
record, laid out by seeded rejection sampling until every parsed relation holds and no shapes overlap, and drawn
with `shapes.render`. Unstated colours, sizes, rotations and the background are drawn from the seed. A diffusion
backend implements the same `generate(prompt, seed) -> PIL.Image` (e.g. a diffusers pipeline actor on a GPU).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

from raytrain.config import RaytrainError
from raytrain.data import shapes
from raytrain.pipelines.ctrlsynth.prompt import ImagePrompt
from raytrain.pipelines.ctrlsynth.tags import Tags, canonical_relation, parse_caption

T2I_BACKENDS = ("procedural",)


class T2IError(RaytrainError):
    pass


class T2I(Protocol):
    name: str

    def generate(self, prompt: ImagePrompt, seed: int) -> Any: ...


@dataclass
class T2IConfig:
    backend: str = "procedural"
    image_size: int = 64
    layout_attempts: int = 200  # random layouts tried before giving up on a caption's relations

    def __post_init__(self) -> None:
        if self.backend not in T2I_BACKENDS:
            raise ValueError(f"backend={self.backend!r}; expected one of {', '.join(T2I_BACKENDS)}")


class ProceduralT2I:
    name = "procedural-renderer-1"

    def __init__(self, cfg: T2IConfig) -> None:
        self.cfg = cfg

    def generate(self, prompt: ImagePrompt, seed: int) -> Any:
        return shapes.render(caption_scene(prompt.caption, random.Random(seed), self.cfg.layout_attempts),
                             self.cfg.image_size)


def build_t2i(cfg: T2IConfig) -> T2I:
    return ProceduralT2I(cfg)


def caption_scene(caption: str, rng: random.Random, attempts: int = 200) -> shapes.Scene:
    """A scene record that shows what the caption says; raises T2IError if it names no shape or its relations
    cannot all be laid out."""
    tags = parse_caption(caption)
    if not tags.objects:
        raise T2IError(f"the caption names no shape the renderer draws: {caption!r}")
    background = rng.choice(list(shapes.BACKGROUNDS))
    attrs = [tags.attrs_of(i) for i in range(len(tags.objects))]
    colours = [next((a for a in a_ if a in shapes.COLOURS), None) or rng.choice(
        [c for c in shapes.COLOURS if c != background]) for a_ in attrs]
    if background in colours:  # a shape in the background's colour would be invisible
        background = next(b for b in shapes.BACKGROUNDS if b not in colours)
    sizes = [next((a for a in a_ if a in shapes.SIZES), None) or rng.choice(list(shapes.SIZES)) for a_ in attrs]
    for _ in range(attempts):
        objects = _place(tags, colours, sizes, rng)
        if objects is not None and _relations_hold(tags, objects):
            return shapes.Scene(objects, background, shapes.spatial_relations(objects))
    raise T2IError(f"no layout satisfies the caption's relations: {caption!r}")


def _place(tags: Tags, colours: list[str], sizes: list[str], rng: random.Random) -> list[shapes.SceneObject] | None:
    objects: list[shapes.SceneObject] = []
    for shape, colour, size in zip(tags.objects, colours, sizes):
        r = shapes.SIZES[size]
        x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        if any(math.dist((x, y), (o.x, o.y)) <= r + shapes.SIZES[o.size] + 0.02 for o in objects):
            return None
        objects.append(shapes.SceneObject(shape, colour, size, round(x, 4), round(y, 4),
                                          round(rng.uniform(-20, 20), 1)))
    return objects


def _relations_hold(tags: Tags, objects: list[shapes.SceneObject]) -> bool:
    drawn = {canonical_relation(r.subject, r.predicate, r.object) for r in shapes.spatial_relations(objects)}
    return all(canonical_relation(s, p, o) in drawn for s, p, o in tags.relations)
